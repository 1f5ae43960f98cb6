// Command goyamux is agentd's reference peer: a small program around hashicorp/yamux that the
// interop tests and bench/mux.py run as a separate process to prove agentd.mux against the real
// Go library and to measure the Go baseline on this machine.
//
// Build (GOPATH mode, Debian's golang-github-hashicorp-yamux-dev, no go.mod):
//
//	GO111MODULE=off GOPATH=$(mktemp -d):/usr/share/gocode go build -o goyamux ./interop/goyamux
//
// Usage:
//
//	goyamux -role server -listen unix:/tmp/s.sock [-serve cmd|none] [-backlog 256]
//	goyamux -role client -dial   tcp:127.0.0.1:7000 -script echo,sink,...
//	goyamux -role client -dial   unix:/tmp/s.sock   -bench sink -size 268435456
//
// Flags shared by both roles: -keepalive DURATION (0 disables Go's keepalive pings),
// -write-timeout DURATION (ConnectionWriteTimeout, also the ping-answer deadline), -backlog N,
// -window BYTES (MaxStreamWindowSize: advertised to the peer as an extra delta on SYN/ACK).
// The yamux role (client: odd stream ids) is independent of dialing or listening; by default a
// server listens and a client dials. A listener prints "LISTENING <addr>" (with the real TCP
// port) as its first stdout line and serves every connection until killed.
//
// Per-stream protocol (the same one agentd's Python test server and bench peer speak): the
// opener writes one command line terminated by "\n", then payload.
//
//	E | echo      echo every byte until EOF, then close
//	S | sink      count bytes until EOF, answer "<count>\n", close
//	source N [TAG]  write N pattern bytes, close the write side, then discard reads until EOF;
//	              with TAG, print {"event":"sourced","tag":TAG,"wrote":N} once Write returned
//	              (all N bytes were within the window the peer granted)
//	goaway        send GoAway(normal) on the session, then behave like echo
//	watch TAG     answer "watching\n", read until EOF or error, then print
//	              {"event":"watch","tag":TAG,"read":n,"err":...} on stdout
//	rst           (Python servers only: hashicorp/yamux has no stream reset API)
//	drop          (Python servers only: close the stream at once without reading)
//
// A stream that reaches EOF before a full command line is simply closed. -serve none never
// accepts a stream, so the accept backlog fills up and later SYNs are answered with RST;
// -accept-delay lets streams pile up in the backlog before accepting starts.
//
// Script scenarios (-script, Go client against a server speaking the protocol above) print one
// JSON object per scenario: {"scenario":..,"ok":bool,"error":..,...}. Benchmarks (-bench) print one
// JSON object: {"workload":..,"value":..,"unit":..,"n":..,"seconds":..,"cpu":..} (cpu: this
// process's CPU seconds during the workload).
//
// Note on the Debian snapshot (git 2019-09-23, older than v0.1.2 that Coder pins): Read on a
// stream in LocalClose returns EOF as soon as its buffer is empty, so after our own Close we
// poll Read for the peer's answer (readAfterClose) instead of blocking on it.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/yamux"
)

var (
	flagRole         = flag.String("role", "server", "yamux role: client (odd ids) or server (even ids)")
	flagListen       = flag.String("listen", "", "listen on unix:PATH or tcp:HOST:PORT")
	flagDial         = flag.String("dial", "", "dial unix:PATH or tcp:HOST:PORT")
	flagServe        = flag.String("serve", "cmd", "server behaviour for accepted streams: cmd or none")
	flagScript       = flag.String("script", "", "comma-separated client scenarios")
	flagBench        = flag.String("bench", "", "client benchmark workload: sink, echo, rt, newstream, openclose")
	flagSize         = flag.Int64("size", 64<<20, "bytes moved by sink/echo benchmarks")
	flagStreams      = flag.Int("streams", 1, "concurrent streams for the echo benchmark")
	flagWorkers      = flag.Int("workers", 1, "concurrent openers for the openclose benchmark")
	flagDuration     = flag.Duration("duration", 2*time.Second, "duration of rt/newstream/openclose benchmarks")
	flagChunk        = flag.Int("chunk", 256<<10, "write size for sink/echo benchmarks")
	flagBacklog      = flag.Int("backlog", 256, "AcceptBacklog")
	flagAcceptDelay  = flag.Duration("accept-delay", 0, "server: wait this long after a session starts before accepting")
	flagKeepalive    = flag.Duration("keepalive", 30*time.Second, "keepalive interval (0 disables)")
	flagWriteTimeout = flag.Duration("write-timeout", 10*time.Second, "ConnectionWriteTimeout")
	flagWindow       = flag.Int("window", 256<<10, "MaxStreamWindowSize (at least 256 KiB)")
	flagVerbose      = flag.Bool("v", false, "let yamux log to stderr")
)

var stdoutMu sync.Mutex

func emit(v interface{}) {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	stdoutMu.Lock()
	defer stdoutMu.Unlock()
	os.Stdout.Write(append(b, '\n'))
}

func fatalf(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "goyamux: "+format+"\n", args...)
	os.Exit(2)
}

func config() *yamux.Config {
	c := yamux.DefaultConfig()
	c.AcceptBacklog = *flagBacklog
	c.EnableKeepAlive = *flagKeepalive > 0
	if *flagKeepalive > 0 {
		c.KeepAliveInterval = *flagKeepalive
	}
	c.ConnectionWriteTimeout = *flagWriteTimeout
	c.MaxStreamWindowSize = uint32(*flagWindow)
	if !*flagVerbose {
		c.LogOutput = ioutil.Discard
	}
	return c
}

func splitAddr(addr string) (network, address string) {
	i := strings.IndexByte(addr, ':')
	if i < 0 {
		fatalf("address %q is not unix:PATH or tcp:HOST:PORT", addr)
	}
	network, address = addr[:i], addr[i+1:]
	if network != "unix" && network != "tcp" {
		fatalf("unknown transport %q", network)
	}
	return network, address
}

func newSession(conn net.Conn) (*yamux.Session, error) {
	if *flagRole == "client" {
		return yamux.Client(conn, config())
	}
	return yamux.Server(conn, config())
}

func main() {
	flag.Parse()
	if *flagRole != "client" && *flagRole != "server" {
		fatalf("-role must be client or server")
	}
	switch {
	case *flagListen != "" && *flagDial == "":
		listen()
	case *flagDial != "" && *flagListen == "":
		network, address := splitAddr(*flagDial)
		conn, err := net.Dial(network, address)
		if err != nil {
			fatalf("dial: %v", err)
		}
		session, err := newSession(conn)
		if err != nil {
			fatalf("session: %v", err)
		}
		runSession(session)
		session.Close()
	default:
		fatalf("give exactly one of -listen and -dial")
	}
}

func listen() {
	network, address := splitAddr(*flagListen)
	if network == "unix" {
		os.Remove(address)
	}
	ln, err := net.Listen(network, address)
	if err != nil {
		fatalf("listen: %v", err)
	}
	fmt.Printf("LISTENING %s:%s\n", network, ln.Addr().String())
	for {
		conn, err := ln.Accept()
		if err != nil {
			fatalf("accept: %v", err)
		}
		go func() {
			session, err := newSession(conn)
			if err != nil {
				conn.Close()
				return
			}
			runSession(session)
		}()
	}
}

// runSession does what the flags ask on one session: a script, a benchmark, or serving streams.
func runSession(session *yamux.Session) {
	switch {
	case *flagScript != "":
		for _, name := range strings.Split(*flagScript, ",") {
			emit(runScenario(session, name))
		}
	case *flagBench != "":
		emit(runBench(session, *flagBench))
	default:
		serve(session)
	}
}

// ---------------------------------------------------------------------------------------------
// Server side

func serve(session *yamux.Session) {
	defer session.Close()
	if *flagServe == "none" {
		<-session.CloseChan()
		return
	}
	time.Sleep(*flagAcceptDelay)
	for {
		stream, err := session.AcceptStream()
		if err != nil {
			return
		}
		go handle(session, stream)
	}
}

func handle(session *yamux.Session, stream *yamux.Stream) {
	defer stream.Close()
	r := bufio.NewReaderSize(stream, 512)
	line, err := r.ReadString('\n')
	if err != nil {
		return
	}
	fields := strings.Fields(line)
	if len(fields) == 0 {
		return
	}
	switch fields[0] {
	case "E", "echo":
		echo(r, stream)
	case "S", "sink":
		n, _ := io.Copy(ioutil.Discard, r)
		fmt.Fprintf(stream, "%d\n", n)
	case "source":
		if len(fields) != 2 && len(fields) != 3 {
			return
		}
		n, err := strconv.ParseInt(fields[1], 10, 64)
		if err != nil {
			return
		}
		if writePattern(stream, n) != nil {
			return
		}
		if len(fields) == 3 {
			emit(map[string]interface{}{"event": "sourced", "tag": fields[2], "wrote": n})
		}
		stream.Close()
		io.Copy(ioutil.Discard, r)
	case "goaway":
		if err := session.GoAway(); err != nil {
			return
		}
		echo(r, stream)
	case "watch":
		tag := ""
		if len(fields) > 1 {
			tag = fields[1]
		}
		if _, err := stream.Write([]byte("watching\n")); err != nil {
			return
		}
		n, err := io.Copy(ioutil.Discard, r)
		msg := ""
		if err != nil {
			msg = err.Error()
		}
		emit(map[string]interface{}{"event": "watch", "tag": tag, "read": n, "err": msg})
	}
}

// echoBuffers keeps per-stream allocations out of the stream-per-request benchmarks.
var echoBuffers = sync.Pool{New: func() interface{} { return make([]byte, 64<<10) }}

func echo(r io.Reader, w io.Writer) {
	buf := echoBuffers.Get().([]byte)
	defer echoBuffers.Put(buf)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func pattern(n int64) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i>>8)
	}
	return b
}

func writePattern(w io.Writer, n int64) error {
	_, err := w.Write(pattern(n))
	return err
}

// ---------------------------------------------------------------------------------------------
// Client helpers

// readAfterClose collects the peer's answer after our own Close (see the package comment): it
// polls Read until the peer's FIN has arrived and the buffer is drained, or until timeout.
func readAfterClose(stream *yamux.Stream, timeout time.Duration) ([]byte, error) {
	var out bytes.Buffer
	buf := make([]byte, 4096)
	deadline := time.Now().Add(timeout)
	for {
		n, err := stream.Read(buf)
		out.Write(buf[:n])
		if err == io.EOF {
			if bytes.HasSuffix(out.Bytes(), []byte("\n")) {
				return out.Bytes(), nil
			}
			if time.Now().After(deadline) {
				return out.Bytes(), fmt.Errorf("no complete answer within %v (got %q)", timeout, out.String())
			}
			time.Sleep(100 * time.Microsecond)
			continue
		}
		if err != nil {
			return out.Bytes(), err
		}
	}
}

func openCmd(session *yamux.Session, cmd string) (*yamux.Stream, error) {
	stream, err := session.OpenStream()
	if err != nil {
		return nil, err
	}
	if _, err := stream.Write([]byte(cmd + "\n")); err != nil {
		stream.Close()
		return nil, err
	}
	return stream, nil
}

// echoThrough writes payload on an echo stream in one Write call while reading it back.
func echoThrough(stream *yamux.Stream, payload []byte) error {
	errc := make(chan error, 1)
	go func() {
		_, err := stream.Write(payload)
		errc <- err
	}()
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(stream, got); err != nil {
		return fmt.Errorf("read back: %v", err)
	}
	if err := <-errc; err != nil {
		return fmt.Errorf("write: %v", err)
	}
	if !bytes.Equal(got, payload) {
		return errors.New("echoed bytes differ")
	}
	return nil
}

// ---------------------------------------------------------------------------------------------
// Script scenarios

type result map[string]interface{}

func runScenario(session *yamux.Session, name string) result {
	res := result{"scenario": name}
	start := time.Now()
	err := scenario(session, name, res)
	res["ok"] = err == nil
	res["error"] = ""
	if err != nil {
		res["error"] = err.Error()
	}
	res["seconds"] = time.Since(start).Seconds()
	return res
}

func scenario(session *yamux.Session, name string, res result) error {
	switch name {
	case "echo":
		stream, err := openCmd(session, "echo")
		if err != nil {
			return err
		}
		defer stream.Close()
		return echoThrough(stream, pattern(100_000))

	case "bigwrite": // 1 MiB in one Write through a 256 KiB window, echoed back
		stream, err := openCmd(session, "echo")
		if err != nil {
			return err
		}
		defer stream.Close()
		return echoThrough(stream, pattern(1<<20))

	case "hugewrite": // 4 MiB in one Write: with -window 1 MiB, frames up to 1 MiB each way
		stream, err := openCmd(session, "echo")
		if err != nil {
			return err
		}
		defer stream.Close()
		return echoThrough(stream, pattern(4<<20))

	case "sink": // 1 MiB in one Write, then half-close; the peer answers after our FIN
		stream, err := openCmd(session, "sink")
		if err != nil {
			return err
		}
		if _, err := stream.Write(pattern(1 << 20)); err != nil {
			return err
		}
		stream.Close()
		answer, err := readAfterClose(stream, 10*time.Second)
		if err != nil {
			return err
		}
		res["answer"] = strings.TrimSpace(string(answer))
		if strings.TrimSpace(string(answer)) != strconv.Itoa(1<<20) {
			return fmt.Errorf("sink answered %q, want %d", answer, 1<<20)
		}
		return nil

	case "halfclose": // the peer half-closes first; we read to EOF, then still write and close
		stream, err := openCmd(session, "source 300000")
		if err != nil {
			return err
		}
		got, err := ioutil.ReadAll(stream)
		if err != nil {
			return fmt.Errorf("read to EOF: %v", err)
		}
		if !bytes.Equal(got, pattern(300000)) {
			return fmt.Errorf("source sent %d bytes, not the 300000-byte pattern", len(got))
		}
		if _, err := stream.Write([]byte("still writable after peer FIN")); err != nil {
			return fmt.Errorf("write after peer FIN: %v", err)
		}
		return stream.Close()

	case "concurrent": // 200 streams at once, each echoing 16 KiB
		var wg sync.WaitGroup
		errs := make(chan error, 200)
		for i := 0; i < 200; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				stream, err := openCmd(session, "echo")
				if err != nil {
					errs <- err
					return
				}
				defer stream.Close()
				payload := append([]byte(fmt.Sprintf("stream %d:", i)), pattern(16<<10)...)
				if err := echoThrough(stream, payload); err != nil {
					errs <- fmt.Errorf("stream %d: %v", i, err)
				}
			}(i)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			return err
		}
		return nil

	case "cycles": // 10,000 sequential open / round trip / close; then no stream may be left
		for i := 0; i < 10000; i++ {
			stream, err := openCmd(session, "E")
			if err != nil {
				return fmt.Errorf("cycle %d open: %v", i, err)
			}
			if _, err := stream.Write([]byte{byte(i)}); err != nil {
				return fmt.Errorf("cycle %d write: %v", i, err)
			}
			one := make([]byte, 1)
			if _, err := io.ReadFull(stream, one); err != nil || one[0] != byte(i) {
				return fmt.Errorf("cycle %d read: %v %v", i, one, err)
			}
			stream.Close()
		}
		res["cycles"] = 10000
		deadline := time.Now().Add(10 * time.Second)
		for session.NumStreams() > 0 {
			if time.Now().After(deadline) {
				return fmt.Errorf("%d streams still open 10 s after the last close", session.NumStreams())
			}
			time.Sleep(time.Millisecond)
		}
		return nil

	case "ping":
		var rtts []float64
		for i := 0; i < 3; i++ {
			rtt, err := session.Ping()
			if err != nil {
				return err
			}
			rtts = append(rtts, rtt.Seconds())
		}
		res["rtts"] = rtts
		return nil

	case "keepalive": // run with -keepalive 50ms -write-timeout 1s: unanswered pings close the session
		time.Sleep(1500 * time.Millisecond)
		if session.IsClosed() {
			return errors.New("session closed: keepalive pings were not answered in time")
		}
		stream, err := openCmd(session, "echo")
		if err != nil {
			return err
		}
		defer stream.Close()
		return echoThrough(stream, []byte("alive"))

	case "goaway": // the peer sends GoAway(normal): new opens fail, the existing stream finishes
		stream, err := openCmd(session, "goaway")
		if err != nil {
			return err
		}
		// The echo answer is sent after the GoAway frame, so once it is back the GoAway was seen.
		if err := echoThrough(stream, []byte("before")); err != nil {
			return err
		}
		if extra, err := session.OpenStream(); err != yamux.ErrRemoteGoAway {
			if extra != nil {
				extra.Close()
			}
			return fmt.Errorf("Open after GoAway returned %v, want %v", err, yamux.ErrRemoteGoAway)
		}
		if err := echoThrough(stream, pattern(300000)); err != nil {
			return fmt.Errorf("existing stream after GoAway: %v", err)
		}
		return stream.Close()

	case "drop": // the peer closes at once and reads nothing: a big Write must fail, not hang
		stream, err := openCmd(session, "drop")
		if err != nil {
			return err
		}
		errc := make(chan error, 1)
		go func() {
			_, err := stream.Write(pattern(2 << 20))
			errc <- err
		}()
		select {
		case werr := <-errc:
			res["write_error"] = fmt.Sprint(werr)
			if werr == nil {
				return errors.New("2 MiB Write to a stream the peer closed succeeded")
			}
			return nil
		case <-time.After(5 * time.Second):
			return errors.New("Write to a stream the peer closed still blocked after 5 s")
		}

	case "rst": // the peer resets the stream: Read and Write report "connection reset"
		stream, err := openCmd(session, "rst")
		if err != nil {
			return err
		}
		buf := make([]byte, 16)
		_, rerr := stream.Read(buf)
		res["read_error"] = fmt.Sprint(rerr)
		if rerr != yamux.ErrConnectionReset {
			return fmt.Errorf("Read after peer reset returned %v, want %v", rerr, yamux.ErrConnectionReset)
		}
		_, werr := stream.Write([]byte("x"))
		res["write_error"] = fmt.Sprint(werr)
		if werr != yamux.ErrConnectionReset {
			return fmt.Errorf("Write after peer reset returned %v, want %v", werr, yamux.ErrConnectionReset)
		}
		return nil
	}
	return fmt.Errorf("unknown scenario %q", name)
}

// ---------------------------------------------------------------------------------------------
// Benchmarks

// cpuSeconds is the user+system CPU time this process has used so far.
func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

func runBench(session *yamux.Session, workload string) result {
	start, cpuStart := time.Now(), cpuSeconds()
	n, unit, err := bench(session, workload)
	secs := time.Since(start).Seconds()
	res := result{"workload": workload, "n": n, "seconds": secs, "unit": unit, "error": "",
		"cpu": cpuSeconds() - cpuStart}
	if err != nil {
		res["error"] = err.Error()
		res["value"] = 0.0
	} else if unit == "MB/s" {
		res["value"] = float64(n) / secs / 1e6
	} else {
		res["value"] = float64(n) / secs
	}
	return res
}

func bench(session *yamux.Session, workload string) (int64, string, error) {
	chunk := pattern(int64(*flagChunk))
	switch workload {
	case "sink":
		stream, err := openCmd(session, "S")
		if err != nil {
			return 0, "", err
		}
		for left := *flagSize; left > 0; {
			part := chunk
			if int64(len(part)) > left {
				part = part[:left]
			}
			if _, err := stream.Write(part); err != nil {
				return 0, "", err
			}
			left -= int64(len(part))
		}
		stream.Close()
		answer, err := readAfterClose(stream, 60*time.Second)
		if err != nil {
			return 0, "", err
		}
		if strings.TrimSpace(string(answer)) != strconv.FormatInt(*flagSize, 10) {
			return 0, "", fmt.Errorf("sink counted %q", answer)
		}
		return *flagSize, "MB/s", nil

	case "echo":
		per := *flagSize / int64(*flagStreams)
		var wg sync.WaitGroup
		var failed atomic.Value
		for i := 0; i < *flagStreams; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				stream, err := openCmd(session, "E")
				if err != nil {
					failed.Store(err)
					return
				}
				defer stream.Close()
				go func() {
					for left := per; left > 0; {
						part := chunk
						if int64(len(part)) > left {
							part = part[:left]
						}
						if _, err := stream.Write(part); err != nil {
							failed.Store(err)
							return
						}
						left -= int64(len(part))
					}
				}()
				if _, err := io.CopyN(ioutil.Discard, stream, per); err != nil {
					failed.Store(err)
				}
			}()
		}
		wg.Wait()
		if err, ok := failed.Load().(error); ok {
			return 0, "", err
		}
		return per * int64(*flagStreams), "MB/s", nil

	case "rt":
		stream, err := openCmd(session, "E")
		if err != nil {
			return 0, "", err
		}
		defer stream.Close()
		msg, back := chunk[:64], make([]byte, 64)
		var count int64
		for end := time.Now().Add(*flagDuration); time.Now().Before(end); count++ {
			if _, err := stream.Write(msg); err != nil {
				return 0, "", err
			}
			if _, err := io.ReadFull(stream, back); err != nil {
				return 0, "", err
			}
		}
		return count, "op/s", nil

	case "newstream":
		req := append([]byte("E\n"), chunk[:64]...)
		back := make([]byte, 64)
		var count int64
		for end := time.Now().Add(*flagDuration); time.Now().Before(end); count++ {
			stream, err := session.OpenStream()
			if err != nil {
				return 0, "", err
			}
			if _, err := stream.Write(req); err != nil {
				return 0, "", err
			}
			if _, err := io.ReadFull(stream, back); err != nil {
				return 0, "", err
			}
			stream.Close()
		}
		return count, "op/s", nil

	case "openclose": // open and immediately close, -workers openers at once; an echo round trip ends it
		var count int64
		var wg sync.WaitGroup
		var failed atomic.Value
		end := time.Now().Add(*flagDuration)
		for w := 0; w < *flagWorkers; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Now().Before(end) {
					stream, err := session.OpenStream()
					if err != nil {
						failed.Store(err)
						return
					}
					stream.Close()
					atomic.AddInt64(&count, 1)
				}
			}()
		}
		wg.Wait()
		if err, ok := failed.Load().(error); ok {
			return 0, "", err
		}
		stream, err := openCmd(session, "E")
		if err != nil {
			return 0, "", err
		}
		defer stream.Close()
		if err := echoThrough(stream, []byte("x")); err != nil {
			return 0, "", err
		}
		return count, "op/s", nil
	}
	return 0, "", fmt.Errorf("unknown workload %q", workload)
}
