// Command atomkv is an in-memory JSON key-value server with per-key
// revisions, compare-and-swap, expiring keys and live change streams over
// Server-Sent Events and WebSocket. It is open to every web page (CORS)
// and serves its own JavaScript client at "/".
//
// The contract is SPEC.md; README.md tells how to use it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Getenv, os.Stdout); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		fmt.Fprintln(os.Stderr, "atomkv:", err)
		os.Exit(1)
	}
}

// config is what the flags set.
type config struct {
	addr          string
	maxKeyBytes   int
	maxValueBytes int64
	maxKeys       int64
	heartbeat     time.Duration
	writeTimeout  time.Duration
	origins       string
	logRequests   bool
	defaultTTL    ttlFlag
	maxSubs       int64
	maxWSSubs     int // subscriptions per WebSocket
	kvserverREST  string
	history       int
	data          string
	fsync         fsyncMode
	tokens        string
	public        publicFlag
	adminAddr     string
	logFormat     string
}

// ttlFlag is a flag holding a TTL in parseTTL's syntax; "0" or "off" is none.
type ttlFlag time.Duration

func (f *ttlFlag) String() string { return time.Duration(*f).String() }

func (f *ttlFlag) Set(s string) error {
	if s == "0" || s == "off" {
		*f = 0
		return nil
	}
	d, err := parseTTL(s)
	*f = ttlFlag(d)
	return err
}

// parseConfig reads the flags from args, each defaulting to the
// environment variable ATOMKV_<NAME> (dashes as underscores) if set.
func parseConfig(args []string, getenv func(string) string, output io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("atomkv", flag.ContinueOnError)
	fs.SetOutput(output)
	fs.StringVar(&c.addr, "addr", ":8000", "listen `address`")
	fs.IntVar(&c.maxKeyBytes, "max-key-bytes", 4096, "longest key in bytes")
	fs.Int64Var(&c.maxValueBytes, "max-value-bytes", 1<<20, "largest value in bytes (413 past it)")
	fs.Int64Var(&c.maxKeys, "max-keys", 0, "most keys the store holds, 0 for no limit (507 past it)")
	fs.DurationVar(&c.heartbeat, "heartbeat", 15*time.Second, "interval of the comment line that keeps event streams alive")
	fs.DurationVar(&c.writeTimeout, "write-timeout", 30*time.Second, "close a stream whose client accepts no write for this long")
	fs.StringVar(&c.origins, "origins", "*", "comma-separated `origins` allowed by CORS and WebSocket, or *")
	fs.BoolVar(&c.logRequests, "log-requests", false, "log one line per request")
	fs.Int64Var(&c.maxSubs, "max-subscribers", 0, "most open event streams and WebSockets, 0 for no limit (503 past it)")
	fs.IntVar(&c.maxWSSubs, "max-subscriptions", 10_000, "most subscriptions one WebSocket may hold (an error past it)")
	fs.StringVar(&c.kvserverREST, "kvserver-rest", "", "serve KvServer's REST shape under this `path`, e.g. /storage (off if empty)")
	fs.Var(&c.defaultTTL, "default-ttl", "TTL of every key written without one, e.g. 24h (0: keys without a TTL never expire)")
	fs.IntVar(&c.history, "history", defaultHistory, "remember at least this many recent changes, so that clients can resume from them")
	fs.StringVar(&c.data, "data", "", "keep the store on disk in this `directory` (off if empty: in memory only)")
	fs.Var(&c.fsync, "fsync", "with -data, when the log reaches the disk itself: always, 1s or never")
	fs.StringVar(&c.tokens, "tokens", "", "require tokens, read from this `file` (<token> <read|write> <path>... per line); SIGHUP reloads it")
	fs.Var(&c.public, "public", "with -tokens, what a request without a token may do: none, read or write")
	fs.StringVar(&c.adminAddr, "admin-addr", "", "serve /healthz, /metrics, /debug/vars and /debug/pprof/ on this `address` (off if empty)")
	fs.StringVar(&c.logFormat, "log-format", "text", "log as text or json")

	var envErr error
	fs.VisitAll(func(f *flag.Flag) {
		name := "ATOMKV_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v := getenv(name); v != "" && envErr == nil {
			if err := f.Value.Set(v); err != nil {
				envErr = fmt.Errorf("invalid value %q for %s: %v", v, name, err)
			}
		}
	})
	if envErr != nil {
		return c, envErr
	}
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	switch {
	case c.maxKeyBytes < 2:
		return c, errors.New("-max-key-bytes must be at least 2")
	case c.maxValueBytes < 4:
		return c, errors.New("-max-value-bytes must be at least 4 (the size of null)")
	case c.maxKeys < 0 || c.maxSubs < 0 || c.history < 0:
		return c, errors.New("-max-keys, -max-subscribers and -history must not be negative")
	case c.heartbeat <= 0 || c.writeTimeout <= 0:
		return c, errors.New("-heartbeat and -write-timeout must be positive")
	case c.maxWSSubs < 1:
		return c, errors.New("-max-subscriptions must be at least 1")
	}
	if c.logFormat != "text" && c.logFormat != "json" {
		return c, fmt.Errorf("-log-format %q: want text or json", c.logFormat)
	}
	if c.public.set && c.tokens == "" {
		return c, errors.New("-public needs -tokens: without it every request may do everything")
	}
	if err := checkRESTPrefix(c.kvserverREST); err != nil {
		return c, err
	}
	return c, nil
}

// run starts the server and serves until ctx is done, then shuts down.
func run(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	cfg, err := parseConfig(args, getenv, stdout)
	if err != nil {
		return err
	}
	var log *slog.Logger
	if cfg.logFormat == "json" {
		log = slog.New(slog.NewJSONHandler(stdout, nil))
	} else {
		log = slog.New(slog.NewTextHandler(stdout, nil))
	}
	srv, err := newServer(cfg, log)
	if err != nil {
		return err
	}
	// The admin listener comes first, so that /healthz says "loading"
	// while the data files load.
	if cfg.adminAddr != "" {
		ln, err := net.Listen("tcp", cfg.adminAddr)
		if err != nil {
			return fmt.Errorf("-admin-addr: %v", err)
		}
		admin := &http.Server{
			Handler:           srv.adminRoutes(),
			ReadHeaderTimeout: 10 * time.Second,
			IdleTimeout:       2 * time.Minute,
			ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelError),
		}
		go admin.Serve(ln)
		defer admin.Close() // last, after the data files are closed
		log.Info("admin listening", "addr", ln.Addr().String())
	}
	var failed <-chan struct{} // a write to the data files failed
	if cfg.data != "" {
		start := time.Now()
		data, err := openData(cfg.data, cfg.fsync, srv.store, log)
		if err != nil {
			return err
		}
		defer data.close()
		failed = data.failed
		log.Info("data loaded", "dir", cfg.data, "keys", srv.store.Len(), "fsync", cfg.fsync.String(), "duration", time.Since(start))
	}

	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return err
	}
	var fresh freshConns
	hs := &http.Server{
		Handler:           srv.routes(),
		ReadHeaderTimeout: 10 * time.Second,
		// A whole request, body included, must arrive within a minute.
		// Streams are not bound by it: they clear their own deadlines.
		ReadTimeout:    time.Minute,
		IdleTimeout:    2 * time.Minute,
		MaxHeaderBytes: 64 << 10,
		ErrorLog:       slog.NewLogLogger(log.Handler(), slog.LevelError),
		ConnState:      fresh.track,
	}
	log.Info("listening", "addr", ln.Addr().String(),
		"max_key_bytes", cfg.maxKeyBytes, "max_value_bytes", cfg.maxValueBytes,
		"max_keys", cfg.maxKeys, "default_ttl", time.Duration(cfg.defaultTTL), "origins", cfg.origins)
	srv.health.Store(healthServing)

	served := make(chan error, 1)
	go func() { served <- hs.Serve(ln) }()
	if srv.access != nil {
		// SIGHUP reloads -tokens, until shutdown.
		hup := make(chan os.Signal, 1)
		signal.Notify(hup, syscall.SIGHUP)
		defer signal.Stop(hup)
		stop, stopped := make(chan struct{}), make(chan struct{})
		defer func() { close(stop); <-stopped }()
		go func() {
			defer close(stopped)
			for {
				select {
				case <-hup:
					srv.reloadTokens()
				case <-stop:
					return
				}
			}
		}()
	}
	var stopErr error
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	case <-failed:
		stopErr = errors.New("a write to the data files failed (see the log); stopped")
	}

	// Within a second, whatever is open. Streams first: Shutdown does not
	// know of them (their connections were hijacked), and they must not
	// wait behind it. Then Shutdown closes the listener and idle
	// connections, and waits for running requests; connections that
	// never sent a request it would wait 5 s for, so they are closed here.
	srv.health.Store(healthStopping)
	srv.close()
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 800*time.Millisecond)
	defer cancel()
	shut := make(chan error, 1)
	go func() { shut <- hs.Shutdown(shutdownCtx) }()
	fresh.closeAll()
	if err := <-shut; err != nil {
		log.Warn("shutdown timed out; closing the remaining connections", "err", err)
		hs.Close()
	}
	<-served
	// Then no change comes but from expiries: stop them, and the data
	// files (deferred above) take what is left and make it durable.
	srv.store.expiry.stop()
	log.Info("stopped")
	return stopErr
}

// freshConns are the connections that have not sent a request yet, which
// http.Server.Shutdown waits 5 s for before it closes them.
type freshConns struct {
	conns    sync.Map // net.Conn → struct{}
	stopping atomic.Bool
}

// track is the http.Server's ConnState hook.
func (f *freshConns) track(c net.Conn, state http.ConnState) {
	switch state {
	case http.StateNew:
		f.conns.Store(c, struct{}{})
		if f.stopping.Load() {
			c.Close() // came as the server stops: closeAll may have missed it
		}
	case http.StateActive, http.StateHijacked, http.StateClosed:
		f.conns.Delete(c)
	}
}

// closeAll closes every connection that has not sent a request, and any
// that comes later.
func (f *freshConns) closeAll() {
	f.stopping.Store(true)
	f.conns.Range(func(c, _ any) bool {
		c.(net.Conn).Close()
		return true
	})
}
