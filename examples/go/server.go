// A worker in Go's net/http: takes its listening socket from fd 3
// (systemd's LISTEN_FDS) and says READY=1 on $NOTIFY_SOCKET.
//
// Build and run under dream:
//
//	go build -o server server.go
//	dream serve --listen :8080 --ready notify -- ./server
//
// On SIGTERM it drains as doc/protocol.md says, not as http.Server.Shutdown
// does (Shutdown closes idle keep-alive connections at once, and a client
// may be sending on one at that very moment: a reset):
//  1. stop accepting: close only the listener;
//  2. answer each further request with "Connection: close", so keep-alive
//     clients reconnect, to the next generation;
//  3. after a grace, close the connections that stayed idle (Shutdown, which
//     then finds few) and wait for the rest to finish;
//  4. exit.
package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"
)

const grace = time.Second

func main() {
	if os.Getenv("LISTEN_PID") != strconv.Itoa(os.Getpid()) {
		fmt.Fprintln(os.Stderr, "no sockets from dream (LISTEN_PID is not this process)")
		os.Exit(1)
	}
	ln, err := net.FileListener(os.NewFile(3, "dream"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "fd 3:", err)
		os.Exit(1)
	}
	release := os.Getenv("DREAM_RELEASE")
	generation := os.Getenv("DREAM_GENERATION")
	var draining atomic.Bool
	body := fmt.Sprintf("<p>release %s</p>\n", release)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Type", "text/html")
		h.Set("X-Dream-Release", release)
		h.Set("X-Dream-Generation", generation)
		if draining.Load() {
			h.Set("Connection", "close")
		}
		fmt.Fprint(w, body)
	})}
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	go srv.Serve(ln)
	notify("READY=1")
	<-term
	draining.Store(true)
	ln.Close()
	time.Sleep(grace)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	srv.Shutdown(ctx)
}

// notify sends an sd_notify message (Go reads a leading @ as the abstract
// namespace).
func notify(state string) {
	addr := os.Getenv("NOTIFY_SOCKET")
	if addr == "" {
		return
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		fmt.Fprintln(os.Stderr, "NOTIFY_SOCKET:", err)
		return
	}
	defer conn.Close()
	conn.Write([]byte(state))
}
