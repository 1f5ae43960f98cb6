// gohttpupgrade: Go's net/http client asking agentd for the raw-yamux upgrade, as a Go agent
// library would. Usage: gohttpupgrade URL TOKEN. Prints `SWITCHED <upgrade> <12 bytes hex>` after
// sending a SYN and reading the ACK, or `STATUS <code> <content-length>|message|detail|n` on refusal.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
)

func main() {
	req, err := http.NewRequest("GET", os.Args[1], nil)
	if err != nil {
		panic(err)
	}
	if os.Args[2] != "" {
		req.Header.Set("Coder-Session-Token", os.Args[2])
	}
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "yamux")
	// No Client.Timeout: it wraps a 101 body in a type that is not writable.
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		var body struct {
			Message     string `json:"message"`
			Detail      string `json:"detail"`
			Validations []struct {
				Field  string `json:"field"`
				Detail string `json:"detail"`
			} `json:"validations"`
		}
		data, err := io.ReadAll(resp.Body)
		if err != nil {
			fmt.Println("ERR body", err)
			os.Exit(1)
		}
		if err := json.Unmarshal(data, &body); err != nil {
			fmt.Println("ERR json", err)
			os.Exit(1)
		}
		fmt.Printf("STATUS %d %d|%s|%s|%d\n",
			resp.StatusCode, resp.ContentLength, body.Message, body.Detail, len(body.Validations))
		return
	}
	rw, ok := resp.Body.(io.ReadWriteCloser)
	if !ok {
		fmt.Println("ERR 101 body is not writable")
		os.Exit(1)
	}
	if _, err := rw.Write([]byte{0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0}); err != nil {
		panic(err)
	}
	buf := make([]byte, 12)
	if _, err := io.ReadFull(rw, buf); err != nil {
		panic(err)
	}
	fmt.Printf("SWITCHED %s %x\n", resp.Header.Get("Upgrade"), buf)
	rw.Close()
}
