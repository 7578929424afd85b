// goworker — an HTTP server on Go's standard net/http (Debian's golang-go), behind tqproxy.
// Standard library only: it builds offline (workers/go/build).
//
//   - Socket activation: when LISTEN_FDS=1 and LISTEN_PID is this process (tqproxy passed the
//     listening socket as fd 3: a network namespace, `pass_socket`, `transport: unix`), it
//     serves on fd 3, whatever its address family; otherwise on 127.0.0.1:$PORT.
//
//   - SIGTERM is graceful: http.Server.Shutdown stops accepting, closes idle keep-alive
//     connections and waits for the requests in flight (bounded, below tqproxy's stop_timeout,
//     after which tqproxy sends SIGKILL), then it exits 0.
//
//   - IdleTimeout stays above tqproxy's upstream_idle_timeout (30s): tqproxy closes idle
//     pooled connections first.
//
//     GET /health       ok
//     GET /slow?ms=N    "slow done" after N ms (at most 60000)
//     anything else     hello from go <name> instance <id> generation <gen> (pid <pid>) via <fd 3|port>
package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func env(name, def string) string {
	v := strings.Map(func(r rune) rune {
		if r < 0x20 || r > 0x7e {
			return -1
		}
		return r
	}, os.Getenv(name))
	if v == "" {
		return def
	}
	return v
}

// listener returns fd 3 when tqproxy passed it (sd_listen_fds(3)'s rule), else 127.0.0.1:$PORT.
func listener() (net.Listener, string, error) {
	if os.Getenv("LISTEN_FDS") == "1" && os.Getenv("LISTEN_PID") == strconv.Itoa(os.Getpid()) {
		os.Unsetenv("LISTEN_FDS")
		os.Unsetenv("LISTEN_PID")
		f := os.NewFile(3, "listen-fd-3")
		l, err := net.FileListener(f) // a duplicate: fd 3 itself can go
		f.Close()
		if err != nil {
			return nil, "", fmt.Errorf("fd 3: %w", err)
		}
		return l, "fd 3", nil
	}
	port := os.Getenv("PORT")
	if port == "" {
		return nil, "", errors.New("PORT is not set (and no socket passed as fd 3)")
	}
	addr := net.JoinHostPort("127.0.0.1", port)
	l, err := net.Listen("tcp", addr)
	return l, addr, err
}

func main() {
	log.SetFlags(0)
	log.SetPrefix("goworker: ")
	name := env("WORKER_NAME", "go")
	instance := env("WORKER_INSTANCE", "0")
	generation := env("WORKER_GENERATION", "0")

	l, via, err := listener()
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/health", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		ms, err := strconv.Atoi(r.URL.Query().Get("ms"))
		if err != nil || ms < 0 || ms > 60000 {
			http.Error(w, "ms: 0 to 60000", http.StatusBadRequest)
			return
		}
		time.Sleep(time.Duration(ms) * time.Millisecond)
		fmt.Fprintln(w, "slow done")
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from go %s instance %s generation %s (pid %d) via %s\n",
			name, instance, generation, os.Getpid(), via)
	})
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Instance", instance)
		w.Header().Set("X-Generation", generation)
		mux.ServeHTTP(w, r)
	})
	srv := &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       75 * time.Second,
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	log.Printf("instance %s gen %s listening on %s (pid %d)", instance, generation, via, os.Getpid())

	select {
	case err := <-done:
		log.Fatal(err)
	case <-ctx.Done():
	}
	stop() // a second SIGTERM now kills at once (the default action)
	log.Print("SIGTERM: finishing the requests in flight")
	shutdown, cancel := context.WithTimeout(context.Background(), 8*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdown); err != nil {
		log.Printf("shutdown: %v", err)
		os.Exit(1)
	}
}
