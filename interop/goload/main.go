// Command goload is bench/scale.py's load generator: N Coder-style workspace agents, each on its
// own connection (HTTP/1.1 upgrade to raw yamux over a Unix socket, or a WebSocket over TCP), each
// opening one yamux stream per unary DRPC call as Coder's drpcsdk.MultiplexedConn does. It is in Go
// so that the generator, not the server, is never what limits a measurement.
//
// Build (GOPATH mode, Debian's golang-github-hashicorp-yamux-dev, no go.mod, no other deps):
//
//	GO111MODULE=off GOPATH=$(mktemp -d):/usr/share/gocode go build -o goload ./interop/goload
//
// The request bodies are protobuf messages encoded by bench/scale.py and handed over in the -plan
// JSON file, so this program needs no protobuf library; DRPC frames (wire.md part B) and the
// client half of RFC 6455 are written by hand here.
//
//	{"common": {"GetManifest": "<base64>", ...},
//	 "agents": [{"token": "...", "bodies": {"BatchCreateLogs": "<base64>"}}, ...]}
//
// Protocol with the driver: stdout carries one JSON object per line. After the connect phase goload
// prints {"event":"connected",...}; it then waits for a line "load" on stdin, runs the load phase for
// -duration, prints {"event":"loaded",...}, and waits for "quit" (or EOF) to close every session.
package main

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	mrand "math/rand"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/yamux"
)

const (
	agentPrefix   = "/coder.agent.v2.Agent/"
	tailnetPrefix = "/coder.tailnet.v2.Tailnet/"
	rpcPath       = "/api/v2/workspaceagents/me/rpc?version=2.10&role=agent"
	wsGUID        = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
)

// DRPC packet kinds (wire.md B2).
const (
	kindInvoke    = 1
	kindMessage   = 2
	kindError     = 3
	kindCancel    = 4
	kindClose     = 5
	kindCloseSend = 6
)

type plan struct {
	Common map[string]string `json:"common"`
	Agents []struct {
		Token  string            `json:"token"`
		Bodies map[string]string `json:"bodies"`
	} `json:"agents"`
}

var (
	flagPlan      = flag.String("plan", "", "JSON plan file (tokens and base64 request bodies)")
	flagUnix      = flag.String("unix", "", "Unix socket path (raw yamux upgrade)")
	flagTCP       = flag.String("tcp", "", "host:port for --websocket")
	flagWebSocket = flag.Bool("websocket", false, "WebSocket upgrade over -tcp instead of raw yamux over -unix")
	flagDials     = flag.Int("dials", 32, "connects in flight")
	flagRate      = flag.Float64("rate", 0.25, "RPC/s per agent in the load phase")
	flagDuration  = flag.Duration("duration", 30*time.Second, "load phase length")
	flagMode      = flag.String("mode", "rate", "rate | saturate | cadence")
	flagTimeout   = flag.Duration("timeout", 60*time.Second, "per-RPC and per-connect deadline")
	flagSeed      = flag.Int64("seed", 1, "random phase seed")
	flagRedial    = flag.Bool("redial", false, "redial an agent whose session ends during the load phase (like Coder's agent) and report how long it took")
)

// ------------------------------------------------------------------ statistics

type recorder struct {
	mu        sync.Mutex
	latencies map[string][]time.Duration
	errs      map[string]int
}

func newRecorder() *recorder {
	return &recorder{latencies: map[string][]time.Duration{}, errs: map[string]int{}}
}

func (r *recorder) ok(kind string, d time.Duration) {
	r.mu.Lock()
	r.latencies[kind] = append(r.latencies[kind], d)
	r.mu.Unlock()
}

func (r *recorder) fail(kind string, err error) {
	r.mu.Lock()
	r.errs[kind+": "+classify(err)]++
	r.mu.Unlock()
}

// classify shortens an error to a cause that aggregates well (no addresses, ids or counters).
func classify(err error) string {
	var de *drpcError
	if errors.As(err, &de) {
		text := de.text
		if len(text) > 120 {
			text = text[:120]
		}
		return fmt.Sprintf("drpc error code %d: %s", de.code, text)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "timeout"
	}
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "eof"
	case errors.Is(err, yamux.ErrConnectionReset):
		return "stream reset"
	case errors.Is(err, yamux.ErrSessionShutdown):
		return "session shutdown"
	case errors.Is(err, yamux.ErrStreamClosed):
		return "stream closed"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, syscall.ECONNRESET):
		return "connection reset by peer"
	case errors.Is(err, syscall.EAGAIN):
		return "EAGAIN (listen backlog full)"
	case errors.Is(err, syscall.EMFILE):
		return "EMFILE (too many open files)"
	}
	text := err.Error()
	if i := strings.Index(text, ": "); i >= 0 && strings.HasPrefix(text, "dial") {
		text = text[i+2:]
	}
	return text
}

type summary struct {
	N   int     `json:"n"`
	P50 float64 `json:"p50_ms"`
	P90 float64 `json:"p90_ms"`
	P99 float64 `json:"p99_ms"`
	Max float64 `json:"max_ms"`
}

func summarize(ds []time.Duration) summary {
	if len(ds) == 0 {
		return summary{}
	}
	sorted := append([]time.Duration(nil), ds...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	at := func(q float64) float64 {
		i := int(q*float64(len(sorted))+0.5) - 1
		if i < 0 {
			i = 0
		}
		if i >= len(sorted) {
			i = len(sorted) - 1
		}
		return float64(sorted[i]) / 1e6
	}
	return summary{len(sorted), at(0.5), at(0.9), at(0.99), float64(sorted[len(sorted)-1]) / 1e6}
}

func (r *recorder) report() (map[string]summary, summary, map[string]int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	per := map[string]summary{}
	var all []time.Duration
	for kind, ds := range r.latencies {
		per[kind] = summarize(ds)
		all = append(all, ds...)
	}
	errs := map[string]int{}
	for k, v := range r.errs {
		errs[k] = v
	}
	return per, summarize(all), errs
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

func emit(v interface{}) {
	data, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	os.Stdout.Write(append(data, '\n'))
}

// ------------------------------------------------------------------ WebSocket (client side)

// wsConn is the client half of RFC 6455 as a byte stream (what coder/websocket's NetConn gives the
// agent): each Write is one masked binary message, reads concatenate message payloads, pings are
// answered, a Close frame reads as EOF.
type wsConn struct {
	conn    net.Conn
	r       *bufio.Reader
	wmu     sync.Mutex
	pending []byte // unread payload of the current data frame
	left    uint64 // bytes of the current data frame not yet read from r
}

func (w *wsConn) writeFrame(opcode byte, payload []byte) error {
	var hdr [14]byte
	hdr[0] = 0x80 | opcode
	n := 2
	switch l := len(payload); {
	case l < 126:
		hdr[1] = 0x80 | byte(l)
	case l < 65536:
		hdr[1] = 0x80 | 126
		binary.BigEndian.PutUint16(hdr[2:], uint16(l))
		n = 4
	default:
		hdr[1] = 0x80 | 127
		binary.BigEndian.PutUint64(hdr[2:], uint64(l))
		n = 10
	}
	var mask [4]byte
	if _, err := rand.Read(mask[:]); err != nil {
		return err
	}
	copy(hdr[n:], mask[:])
	n += 4
	buf := make([]byte, n+len(payload))
	copy(buf, hdr[:n])
	for i, b := range payload {
		buf[n+i] = b ^ mask[i&3]
	}
	w.wmu.Lock()
	defer w.wmu.Unlock()
	_, err := w.conn.Write(buf)
	return err
}

func (w *wsConn) Write(p []byte) (int, error) {
	if err := w.writeFrame(0x2, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (w *wsConn) Read(p []byte) (int, error) {
	for w.left == 0 {
		if err := w.nextFrame(); err != nil {
			return 0, err
		}
	}
	if uint64(len(p)) > w.left {
		p = p[:w.left]
	}
	n, err := w.r.Read(p)
	w.left -= uint64(n)
	return n, err
}

// nextFrame reads frame headers until a data frame with a payload starts (w.left > 0), handling
// control frames on the way. Server frames are unmasked.
func (w *wsConn) nextFrame() error {
	var hdr [2]byte
	if _, err := io.ReadFull(w.r, hdr[:]); err != nil {
		return err
	}
	opcode := hdr[0] & 0x0f
	length := uint64(hdr[1] & 0x7f)
	switch length {
	case 126:
		var ext [2]byte
		if _, err := io.ReadFull(w.r, ext[:]); err != nil {
			return err
		}
		length = uint64(binary.BigEndian.Uint16(ext[:]))
	case 127:
		var ext [8]byte
		if _, err := io.ReadFull(w.r, ext[:]); err != nil {
			return err
		}
		length = binary.BigEndian.Uint64(ext[:])
	}
	if hdr[1]&0x80 != 0 {
		return errors.New("websocket: masked frame from server")
	}
	switch opcode {
	case 0x0, 0x2: // continuation, binary
		w.left = length
		return nil
	case 0x1:
		return errors.New("websocket: text message from server")
	case 0x8, 0x9, 0xA:
		if length > 125 {
			return errors.New("websocket: control frame too long")
		}
		payload := make([]byte, length)
		if _, err := io.ReadFull(w.r, payload); err != nil {
			return err
		}
		switch opcode {
		case 0x9:
			return w.writeFrame(0xA, payload)
		case 0x8:
			code := payload
			if len(code) > 2 {
				code = code[:2]
			}
			_ = w.writeFrame(0x8, code)
			return io.EOF
		}
		return nil
	}
	return fmt.Errorf("websocket: unknown opcode %d", opcode)
}

func (w *wsConn) Close() error {
	_ = w.writeFrame(0x8, []byte{0x03, 0xe8})
	return w.conn.Close()
}

// bufferedConn reads what the HTTP response reader buffered past the headers before the socket.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (b *bufferedConn) Read(p []byte) (int, error) { return b.r.Read(p) }

// ------------------------------------------------------------------ connecting

type upgradeError struct{ status string }

func (e *upgradeError) Error() string { return "upgrade refused: " + e.status }

func dial(token string) (io.ReadWriteCloser, error) {
	var conn net.Conn
	var err error
	if *flagWebSocket || *flagTCP != "" {
		conn, err = net.DialTimeout("tcp", *flagTCP, *flagTimeout)
	} else {
		conn, err = net.DialTimeout("unix", *flagUnix, *flagTimeout)
	}
	if err != nil {
		return nil, err
	}
	conn.SetDeadline(time.Now().Add(*flagTimeout))
	var req bytes.Buffer
	fmt.Fprintf(&req, "GET %s HTTP/1.1\r\nHost: agentd\r\nCoder-Session-Token: %s\r\nConnection: Upgrade\r\n", rpcPath, token)
	var key string
	if *flagWebSocket {
		var raw [16]byte
		rand.Read(raw[:])
		key = base64.StdEncoding.EncodeToString(raw[:])
		fmt.Fprintf(&req, "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\n", key)
	} else {
		req.WriteString("Upgrade: yamux\r\n")
	}
	req.WriteString("\r\n")
	if _, err := conn.Write(req.Bytes()); err != nil {
		conn.Close()
		return nil, err
	}
	r := bufio.NewReaderSize(conn, 16384)
	status, err := r.ReadString('\n')
	if err != nil {
		conn.Close()
		return nil, err
	}
	var accept string
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			conn.Close()
			return nil, err
		}
		line = strings.TrimRight(line, "\r\n")
		if line == "" {
			break
		}
		if i := strings.IndexByte(line, ':'); i > 0 && strings.EqualFold(line[:i], "Sec-WebSocket-Accept") {
			accept = strings.TrimSpace(line[i+1:])
		}
	}
	if !strings.HasPrefix(status, "HTTP/1.1 101") {
		conn.Close()
		return nil, &upgradeError{strings.TrimSpace(status)}
	}
	conn.SetDeadline(time.Time{})
	if *flagWebSocket {
		sum := sha1.Sum([]byte(key + wsGUID))
		if accept != base64.StdEncoding.EncodeToString(sum[:]) {
			conn.Close()
			return nil, errors.New("websocket: bad Sec-WebSocket-Accept")
		}
		return &wsConn{conn: conn, r: r}, nil
	}
	return &bufferedConn{conn, r}, nil
}

func yamuxConfig() *yamux.Config {
	c := yamux.DefaultConfig() // what Coder's agent uses: 30 s keepalive, 256 KiB windows
	c.LogOutput = os.Stderr
	return c
}

// ------------------------------------------------------------------ DRPC by hand

type drpcError struct {
	code uint64
	text string
}

func (e *drpcError) Error() string { return fmt.Sprintf("drpc error %d: %s", e.code, e.text) }

func appendVarint(b []byte, v uint64) []byte {
	for v >= 0x80 {
		b = append(b, byte(v)|0x80)
		v >>= 7
	}
	return append(b, byte(v))
}

func appendFrame(b []byte, kind byte, mid uint64, data []byte) []byte {
	b = append(b, kind<<1|1)
	b = appendVarint(b, 1) // stream id: always 1 (one DRPC stream per yamux stream)
	b = appendVarint(b, mid)
	b = appendVarint(b, uint64(len(data)))
	return append(b, data...)
}

func readVarint(r *bufio.Reader) (uint64, error) {
	var v uint64
	for shift := uint(0); shift < 70; shift += 7 {
		c, err := r.ReadByte()
		if err != nil {
			return 0, err
		}
		v |= uint64(c&0x7f) << shift
		if c < 0x80 {
			return v, nil
		}
	}
	return 0, errors.New("drpc: varint too long")
}

// readPacket reads frames until one packet is complete and returns its kind and data.
func readPacket(r *bufio.Reader) (byte, []byte, error) {
	var data []byte
	for {
		control, err := r.ReadByte()
		if err != nil {
			return 0, nil, err
		}
		if _, err := readVarint(r); err != nil { // stream id
			return 0, nil, err
		}
		if _, err := readVarint(r); err != nil { // message id
			return 0, nil, err
		}
		n, err := readVarint(r)
		if err != nil {
			return 0, nil, err
		}
		if n > 4<<20 {
			return 0, nil, errors.New("drpc: frame too large")
		}
		start := len(data)
		data = append(data, make([]byte, n)...)
		if _, err := io.ReadFull(r, data[start:]); err != nil {
			return 0, nil, err
		}
		if control&1 == 1 {
			return (control & 0x7e) >> 1, data, nil
		}
	}
}

func asError(kind byte, data []byte) error {
	switch kind {
	case kindError:
		if len(data) < 8 {
			return &drpcError{0, string(data) + " (invalid error data)"}
		}
		return &drpcError{binary.BigEndian.Uint64(data[:8]), string(data[8:])}
	case kindClose, kindCloseSend:
		return io.ErrUnexpectedEOF
	case kindCancel:
		return errors.New("drpc: canceled by server")
	}
	return fmt.Errorf("drpc: unexpected packet kind %d", kind)
}

type agent struct {
	index   int
	token   string
	bodies  map[string][]byte
	session *yamux.Session
	conn    io.ReadWriteCloser
	streams []*yamux.Stream
	// -redial: mu guards session and down; lost counts the sessions that ended under load
	mu   sync.Mutex
	down bool
	lost int
}

func (a *agent) current() *yamux.Session {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.session
}

func (a *agent) isDown() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.down
}

// watch redials (backoff 100 ms doubling to 10 s, jittered, like Coder's agent) each time the agent's session ends,
// until quit closes; every redial's time from the session ending to GetManifest answered again is
// recorded as "reconnect".
func (a *agent) watch(rec *recorder, quit chan struct{}) {
	for {
		s := a.current()
		if s == nil {
			return
		}
		select {
		case <-s.CloseChan():
		case <-quit:
			return
		}
		lostAt := time.Now()
		a.mu.Lock()
		a.down = true
		a.lost++
		a.mu.Unlock()
		backoff := 100 * time.Millisecond
		for {
			select {
			case <-quit:
				return
			default:
			}
			if conn, err := dial(a.token); err == nil {
				if session, err := yamux.Client(conn, yamuxConfig()); err == nil {
					a.mu.Lock()
					a.session, a.conn = session, conn
					a.mu.Unlock()
					if err := a.unary("GetManifest"); err == nil {
						break
					} else {
						rec.fail("redial GetManifest", err)
					}
					session.Close()
				} else {
					conn.Close()
				}
			} else {
				rec.fail("redial", err)
			}
			time.Sleep(backoff/2 + time.Duration(mrand.Int63n(int64(backoff/2))))
			if backoff *= 2; backoff > 10*time.Second {
				backoff = 10 * time.Second
			}
		}
		a.mu.Lock()
		a.down = false
		a.mu.Unlock()
		rec.ok("reconnect", time.Since(lostAt))
	}
}

// unary makes one call on a fresh yamux stream: Invoke+Message+CloseSend in one write, read the
// reply, then Close and FIN (what a Go drpcconn does on Coder's multiplexed connection).
func (a *agent) unary(method string) error {
	stream, err := a.current().OpenStream()
	if err != nil {
		return err
	}
	defer stream.Close()
	stream.SetDeadline(time.Now().Add(*flagTimeout))
	name := []byte(agentPrefix + method)
	req := make([]byte, 0, 64+len(a.bodies[method]))
	req = appendFrame(req, kindInvoke, 1, name)
	req = appendFrame(req, kindMessage, 2, a.bodies[method])
	req = appendFrame(req, kindCloseSend, 3, nil)
	if _, err := stream.Write(req); err != nil {
		return err
	}
	kind, data, err := readPacket(bufio.NewReaderSize(stream, 4096))
	if err != nil {
		return err
	}
	if kind != kindMessage {
		return asError(kind, data)
	}
	stream.Write(appendFrame(nil, kindClose, 4, nil))
	return nil
}

// openStream starts a streaming call (Coordinate, StreamDERPMaps), waits for its first message
// when wantFirst, and keeps the stream open, draining it, until the session ends.
func (a *agent) openStream(method string, closeSend, wantFirst bool) error {
	stream, err := a.session.OpenStream()
	if err != nil {
		return err
	}
	stream.SetDeadline(time.Now().Add(*flagTimeout))
	req := appendFrame(nil, kindInvoke, 1, []byte(tailnetPrefix+method))
	req = appendFrame(req, kindMessage, 2, a.bodies[method])
	if closeSend {
		req = appendFrame(req, kindCloseSend, 3, nil)
	}
	if _, err := stream.Write(req); err != nil {
		stream.Close()
		return err
	}
	r := bufio.NewReaderSize(stream, 4096)
	if wantFirst {
		kind, data, err := readPacket(r)
		if err != nil {
			stream.Close()
			return err
		}
		if kind != kindMessage {
			stream.Close()
			return asError(kind, data)
		}
	}
	stream.SetDeadline(time.Time{})
	a.streams = append(a.streams, stream)
	go io.Copy(ioutil.Discard, r)
	return nil
}

// ------------------------------------------------------------------ phases

type connectResult struct {
	Event       string             `json:"event"`
	Agents      int                `json:"agents"`
	Connected   int                `json:"connected"`
	Seconds     float64            `json:"seconds"`
	Latency     summary            `json:"connect_latency"`
	Upgrade     summary            `json:"upgrade_latency"`
	Manifest    summary            `json:"manifest_latency"`
	Errors      map[string]int     `json:"errors"`
	CPUSeconds  float64            `json:"cpu_seconds"`
	StreamsOpen map[string]summary `json:"streams_open,omitempty"`
}

func connectAll(agents []*agent) connectResult {
	rec := newRecorder()
	var next int64 = -1
	var wg sync.WaitGroup
	start := time.Now()
	cpu0 := cpuSeconds()
	for w := 0; w < *flagDials; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := atomic.AddInt64(&next, 1)
				if int(i) >= len(agents) {
					return
				}
				a := agents[i]
				t0 := time.Now()
				conn, err := dial(a.token)
				if err != nil {
					rec.fail("upgrade", err)
					continue
				}
				t1 := time.Now()
				session, err := yamux.Client(conn, yamuxConfig())
				if err != nil {
					conn.Close()
					rec.fail("yamux", err)
					continue
				}
				a.session, a.conn = session, conn
				if err := a.unary("GetManifest"); err != nil {
					rec.fail("GetManifest", err)
					session.Close()
					a.session = nil
					continue
				}
				t2 := time.Now()
				if *flagMode == "cadence" {
					if err := a.openStream("StreamDERPMaps", true, true); err != nil {
						rec.fail("StreamDERPMaps", err)
					} else {
						rec.ok("StreamDERPMaps", time.Since(t2))
					}
					t3 := time.Now()
					if err := a.openStream("Coordinate", false, false); err != nil {
						rec.fail("Coordinate", err)
					} else {
						rec.ok("Coordinate", time.Since(t3))
					}
				}
				rec.ok("upgrade", t1.Sub(t0))
				rec.ok("GetManifest", t2.Sub(t1))
				rec.ok("connect", t2.Sub(t0))
			}
		}()
	}
	wg.Wait()
	per, _, errs := rec.report()
	res := connectResult{
		Event:      "connected",
		Agents:     len(agents),
		Connected:  per["connect"].N,
		Seconds:    time.Since(start).Seconds(),
		Latency:    per["connect"],
		Upgrade:    per["upgrade"],
		Manifest:   per["GetManifest"],
		Errors:     errs,
		CPUSeconds: cpuSeconds() - cpu0,
	}
	if *flagMode == "cadence" {
		res.StreamsOpen = map[string]summary{"StreamDERPMaps": per["StreamDERPMaps"], "Coordinate": per["Coordinate"]}
	}
	return res
}

type loadResult struct {
	Event        string             `json:"event"`
	Mode         string             `json:"mode"`
	Seconds      float64            `json:"seconds"`
	RPCs         int                `json:"rpcs"`
	RPCPerSecond float64            `json:"rpc_per_second"`
	Overall      summary            `json:"overall"`
	PerMethod    map[string]summary `json:"per_method"`
	Errors       map[string]int     `json:"errors"`
	ErrorCount   int                `json:"error_count"`
	DeadSessions int                `json:"dead_sessions"`
	CPUSeconds   float64            `json:"cpu_seconds"`
	// -redial: agents whose session ended, their redial times, and their calls that failed meanwhile
	LostAgents     int            `json:"lost_agents"`
	Reconnect      summary        `json:"reconnect"`
	FailoverErrors map[string]int `json:"failover_errors"`
}

type schedule struct {
	method string
	every  time.Duration
}

func runLoad(agents []*agent) loadResult {
	rec := newRecorder()
	rng := mrand.New(mrand.NewSource(*flagSeed))
	start := time.Now()
	deadline := start.Add(*flagDuration)
	cpu0 := cpuSeconds()
	var wg sync.WaitGroup
	failover := newRecorder() // -redial: calls skipped or failed because the agent's session ended
	quit := make(chan struct{})
	var watchers sync.WaitGroup
	if *flagRedial {
		for _, a := range agents {
			if a.session != nil {
				watchers.Add(1)
				go func(a *agent) { defer watchers.Done(); a.watch(failover, quit) }(a)
			}
		}
	}
	call := func(a *agent, method string) {
		if *flagRedial && a.isDown() {
			failover.fail(method, errors.New("skipped: redialing"))
			return
		}
		s := a.current()
		t0 := time.Now()
		if err := a.unary(method); err != nil {
			if *flagRedial && s.IsClosed() {
				failover.fail(method, err)
			} else {
				rec.fail(method, err)
			}
		} else {
			rec.ok(method, time.Since(t0))
		}
	}
	rotation := []string{"UpdateStats", "BatchUpdateMetadata", "BatchCreateLogs"}
	for _, a := range agents {
		if a.session == nil {
			continue
		}
		switch *flagMode {
		case "saturate":
			wg.Add(1)
			go func(a *agent, k int) {
				defer wg.Done()
				for ; time.Now().Before(deadline); k++ {
					call(a, rotation[k%len(rotation)])
				}
			}(a, rng.Intn(len(rotation)))
		case "rate":
			interval := time.Duration(float64(time.Second) / *flagRate)
			phase := time.Duration(rng.Int63n(int64(interval)))
			wg.Add(1)
			go func(a *agent, k int, phase time.Duration) {
				defer wg.Done()
				for i := 0; ; i, k = i+1, k+1 {
					at := start.Add(phase + time.Duration(i)*interval)
					if !at.Before(deadline) {
						return
					}
					time.Sleep(time.Until(at))
					call(a, rotation[k%len(rotation)])
				}
			}(a, rng.Intn(len(rotation)), phase)
		case "cadence":
			for _, s := range []schedule{
				{"UpdateStats", 30 * time.Second},
				{"BatchUpdateMetadata", 10 * time.Second},
				{"BatchCreateLogs", 60 * time.Second},
				{"GetAnnouncementBanners", 120 * time.Second},
			} {
				phase := time.Duration(rng.Int63n(int64(s.every)))
				wg.Add(1)
				go func(a *agent, s schedule, phase time.Duration) {
					defer wg.Done()
					for i := 0; ; i++ {
						at := start.Add(phase + time.Duration(i)*s.every)
						if !at.Before(deadline) {
							return
						}
						time.Sleep(time.Until(at))
						call(a, s.method)
					}
				}(a, s, phase)
			}
		}
	}
	wg.Wait()
	close(quit)
	watchers.Wait()
	elapsed := time.Since(start).Seconds()
	per, overall, errs := rec.report()
	lostAgents := 0
	for _, a := range agents {
		if a.lost > 0 {
			lostAgents++
		}
	}
	fPer, _, fErrs := failover.report()
	count := 0
	for _, v := range errs {
		count += v
	}
	dead := 0
	for _, a := range agents {
		if s := a.current(); s != nil && s.IsClosed() {
			dead++
		}
	}
	return loadResult{
		Event: "loaded", Mode: *flagMode, Seconds: elapsed, RPCs: overall.N,
		RPCPerSecond: float64(overall.N) / elapsed, Overall: overall, PerMethod: per,
		Errors: errs, ErrorCount: count, DeadSessions: dead, CPUSeconds: cpuSeconds() - cpu0,
		LostAgents: lostAgents, Reconnect: fPer["reconnect"], FailoverErrors: fErrs,
	}
}

func main() {
	flag.Parse()
	if *flagPlan == "" || (*flagWebSocket && *flagTCP == "") || (*flagUnix == "" && *flagTCP == "") {
		fmt.Fprintln(os.Stderr, "goload: -plan and -unix or -tcp (with -websocket: -tcp) are required")
		os.Exit(2)
	}
	if *flagMode != "rate" && *flagMode != "saturate" && *flagMode != "cadence" {
		fmt.Fprintln(os.Stderr, "goload: -mode must be rate, saturate or cadence")
		os.Exit(2)
	}
	if *flagRate <= 0 {
		fmt.Fprintln(os.Stderr, "goload: -rate must be positive")
		os.Exit(2)
	}
	raw, err := ioutil.ReadFile(*flagPlan)
	if err != nil {
		fmt.Fprintln(os.Stderr, "goload:", err)
		os.Exit(2)
	}
	var p plan
	if err := json.Unmarshal(raw, &p); err != nil {
		fmt.Fprintln(os.Stderr, "goload: plan:", err)
		os.Exit(2)
	}
	decode := func(m map[string]string, into map[string][]byte) {
		for k, v := range m {
			b, err := base64.StdEncoding.DecodeString(v)
			if err != nil {
				fmt.Fprintf(os.Stderr, "goload: plan: body %s: %v\n", k, err)
				os.Exit(2)
			}
			into[k] = b
		}
	}
	agents := make([]*agent, len(p.Agents))
	for i, pa := range p.Agents {
		a := &agent{index: i, token: pa.Token, bodies: map[string][]byte{}}
		decode(p.Common, a.bodies)
		decode(pa.Bodies, a.bodies)
		agents[i] = a
	}

	cpuStart := cpuSeconds()
	res := connectAll(agents)
	emit(res)

	stdin := bufio.NewScanner(os.Stdin)
	for stdin.Scan() {
		switch strings.TrimSpace(stdin.Text()) {
		case "load":
			emit(runLoad(agents))
		case "quit":
			goto done
		}
	}
done:
	for _, a := range agents {
		if a.session != nil {
			a.session.Close()
		}
	}
	emit(map[string]interface{}{"event": "done", "cpu_seconds": cpuSeconds() - cpuStart})
}
