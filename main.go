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
	maxTxnOps     int
	maxTxnBytes   int64
	kvserverREST  string
	history       int
	data          string
	fsync         fsyncMode
	tokens        string
	public        publicFlag
	adminAddr     string
	logFormat     string
	etcd          string // comma-separated endpoints; "": a single server
	etcdPrefix    string
	etcdCA        string
	etcdCert      string
	etcdKey       string
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
	fs.Int64Var(&c.maxValueBytes, "max-value-bytes", 1<<20, "largest value in bytes, once compacted (413 past it)")
	fs.Int64Var(&c.maxKeys, "max-keys", 0, "most keys the store holds, 0 for no limit (507 past it)")
	fs.DurationVar(&c.heartbeat, "heartbeat", 15*time.Second, "interval of the comment line that keeps event streams alive")
	fs.DurationVar(&c.writeTimeout, "write-timeout", 30*time.Second, "close a stream whose client accepts no write for this long")
	fs.StringVar(&c.origins, "origins", "*", "comma-separated `origins` allowed by CORS and WebSocket, or *")
	fs.BoolVar(&c.logRequests, "log-requests", false, "log one line per request")
	fs.Int64Var(&c.maxSubs, "max-subscribers", 0, "most open event streams and WebSockets, 0 for no limit (503 past it)")
	fs.IntVar(&c.maxWSSubs, "max-subscriptions", 10_000, "most subscriptions one WebSocket may hold (an error past it)")
	fs.IntVar(&c.maxTxnOps, "max-txn-ops", 128, "most ops, and most checks, in one transaction (400 past it)")
	fs.Int64Var(&c.maxTxnBytes, "max-txn-bytes", 4<<20, "largest transaction body in bytes (413 past it)")
	fs.StringVar(&c.kvserverREST, "kvserver-rest", "", "serve KvServer's REST shape under this `path`, e.g. /storage (off if empty)")
	fs.Var(&c.defaultTTL, "default-ttl", "TTL of every key written without one, e.g. 24h (0: keys without a TTL never expire)")
	fs.IntVar(&c.history, "history", defaultHistory, "remember at least this many recent changes, so that clients can resume from them")
	fs.StringVar(&c.data, "data", "", "keep the store on disk in this `directory` (off if empty: in memory only)")
	fs.Var(&c.fsync, "fsync", "with -data, when the log reaches the disk itself: always, 1s or never")
	fs.StringVar(&c.tokens, "tokens", "", "require tokens, read from this `file` (<token> <read|write> <path>... per line); SIGHUP reloads it")
	fs.Var(&c.public, "public", "with -tokens, what a request without a token may do: none, read or write")
	fs.StringVar(&c.adminAddr, "admin-addr", "", "serve /healthz, /metrics, /debug/vars and /debug/pprof/ on this `address` (off if empty)")
	fs.StringVar(&c.logFormat, "log-format", "text", "log as text or json")
	fs.StringVar(&c.etcd, "etcd", "", "run as a node of a cluster whose store is the etcd cluster at these comma-separated `URLs` (off if empty)")
	fs.StringVar(&c.etcdPrefix, "etcd-prefix", "/atomkv", "with -etcd, the `prefix` of every etcd key the cluster keeps")
	fs.StringVar(&c.etcdCA, "etcd-ca", "", "with -etcd over https, the CA `file` of the members' certificates (empty: the system's)")
	fs.StringVar(&c.etcdCert, "etcd-cert", "", "with -etcd over https, the client certificate `file` to present (with -etcd-key)")
	fs.StringVar(&c.etcdKey, "etcd-key", "", "with -etcd over https, the client certificate's key `file`")

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
	case c.maxTxnOps < 1 || c.maxTxnBytes < 64:
		return c, errors.New("-max-txn-ops must be at least 1 and -max-txn-bytes at least 64")
	}
	if c.logFormat != "text" && c.logFormat != "json" {
		return c, fmt.Errorf("-log-format %q: want text or json", c.logFormat)
	}
	if c.public.set && c.tokens == "" {
		return c, errors.New("-public needs -tokens: without it every request may do everything")
	}
	if c.etcd != "" && c.data != "" {
		return c, errors.New("-etcd and -data together: a node of a cluster keeps nothing on its disk (etcd does); use one or the other")
	}
	if c.etcd != "" && (c.etcdPrefix == "" || strings.HasSuffix(c.etcdPrefix, "/")) {
		return c, fmt.Errorf("-etcd-prefix %q: want a prefix like /atomkv, not ending with /", c.etcdPrefix)
	}
	if err := checkRESTPrefix(c.kvserverREST); err != nil {
		return c, err
	}
	return c, nil
}

// run starts the server and serves until ctx is done (or a write to the
// data files fails), then shuts down. Each step is a function below.
func run(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) (runErr error) {
	cfg, err := parseConfig(args, getenv, stdout)
	if err != nil {
		return err
	}
	srv, err := newServer(cfg, newLogger(cfg, stdout))
	if err != nil {
		return err
	}
	// The admin listener comes first, so that /healthz says "loading"
	// while the data files load; it closes last, after them.
	closeAdmin, err := startAdmin(srv)
	if err != nil {
		return err
	}
	defer closeAdmin()
	failed, closeData, err := openDataFiles(srv)
	if err != nil {
		return err
	}
	defer func() { // a failed fsync of the last writes is a failure too
		if err := closeData(); err != nil && runErr == nil {
			runErr = err
		}
	}()
	closeCluster, err := joinCluster(srv)
	if err != nil {
		return err
	}
	defer closeCluster()
	web, err := startListener(srv)
	if err != nil {
		return err
	}
	defer reloadOnSIGHUP(srv)()
	stopErr, err := waitForStop(ctx, web.served, failed)
	if err != nil {
		return err // the listener failed: nothing to shut down
	}
	web.shutdown(srv)
	return stopErr
}

// newLogger returns the logger -log-format asks for, writing to stdout.
func newLogger(cfg config, stdout io.Writer) *slog.Logger {
	if cfg.logFormat == "json" {
		return slog.New(slog.NewJSONHandler(stdout, nil))
	}
	return slog.New(slog.NewTextHandler(stdout, nil))
}

// startAdmin serves the admin listener, if -admin-addr asks for one, and
// returns what closes it.
func startAdmin(srv *server) (close func(), err error) {
	if srv.cfg.adminAddr == "" {
		return func() {}, nil
	}
	ln, err := net.Listen("tcp", srv.cfg.adminAddr)
	if err != nil {
		return nil, fmt.Errorf("-admin-addr: %v", err)
	}
	admin := &http.Server{
		Handler:           srv.adminRoutes(),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(srv.log.Handler(), slog.LevelError),
	}
	go admin.Serve(ln)
	srv.log.Info("admin listening", "addr", ln.Addr().String())
	return func() { admin.Close() }, nil
}

// openDataFiles loads the store from -data, if given, and returns a
// channel closed if a write to the data files fails, and what closes
// them (making every acknowledged write durable, or saying why not).
func openDataFiles(srv *server) (failed <-chan struct{}, close func() error, err error) {
	cfg := srv.cfg
	if cfg.data == "" {
		return nil, func() error { return nil }, nil
	}
	start := time.Now()
	data, err := openData(cfg.data, cfg.fsync, srv.store, srv.log)
	if err != nil {
		return nil, nil, err
	}
	srv.log.Info("data loaded", "dir", cfg.data, "keys", srv.store.Len(), "fsync", cfg.fsync.String(), "duration", time.Since(start))
	return data.failed, data.close, nil
}

// joinCluster makes the server a node of the cluster -etcd names, if
// it names one: its view of the keyspace is read from etcd and followed
// from there. It returns what stops following.
func joinCluster(srv *server) (close func(), err error) {
	cfg := srv.cfg
	if cfg.etcd == "" {
		return func() {}, nil
	}
	start := time.Now()
	j, err := openCluster(cfg, srv.store, srv.log)
	if err != nil {
		return nil, err
	}
	srv.cluster = j
	srv.log.Info("cluster joined", "etcd", cfg.etcd, "prefix", cfg.etcdPrefix, "keys", srv.store.Len(), "revision", srv.store.published.Load(), "duration", time.Since(start))
	return func() { j.close() }, nil
}

// listener is the main listener's http.Server as it serves.
type listener struct {
	hs     *http.Server
	fresh  *freshConns
	served chan error // Serve's error, once it returns
}

// startListener listens on -addr and serves the API there.
func startListener(srv *server) (*listener, error) {
	cfg := srv.cfg
	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return nil, err
	}
	l := &listener{fresh: new(freshConns), served: make(chan error, 1)}
	l.hs = &http.Server{
		Handler:           srv.routes(),
		ReadHeaderTimeout: 10 * time.Second,
		// A whole request, body included, must arrive within a minute.
		// Streams are not bound by it: they clear their own deadlines.
		ReadTimeout:    time.Minute,
		IdleTimeout:    2 * time.Minute,
		MaxHeaderBytes: 64 << 10,
		ErrorLog:       slog.NewLogLogger(srv.log.Handler(), slog.LevelError),
		ConnState:      l.fresh.track,
	}
	srv.log.Info("listening", "addr", ln.Addr().String(),
		"max_key_bytes", cfg.maxKeyBytes, "max_value_bytes", cfg.maxValueBytes,
		"max_keys", cfg.maxKeys, "default_ttl", time.Duration(cfg.defaultTTL), "origins", cfg.origins)
	srv.health.Store(healthServing)
	go func() { l.served <- l.hs.Serve(ln) }()
	return l, nil
}

// reloadOnSIGHUP reloads -tokens on each SIGHUP, if there is a -tokens,
// until the function it returns is called.
func reloadOnSIGHUP(srv *server) (stop func()) {
	if srv.access == nil {
		return func() {}
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	done, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		for {
			select {
			case <-hup:
				srv.reloadTokens()
			case <-done:
				return
			}
		}
	}()
	return func() {
		signal.Stop(hup)
		close(done)
		<-stopped
	}
}

// waitForStop returns when the server should stop: ctx is done (nil), or
// the data files failed (stopErr says so). If the listener fails first,
// err is its error.
func waitForStop(ctx context.Context, served <-chan error, failed <-chan struct{}) (stopErr, err error) {
	select {
	case err := <-served:
		return nil, err
	case <-ctx.Done():
		return nil, nil
	case <-failed:
		return errors.New("a write to the data files failed (see the log); stopped"), nil
	}
}

// shutdown stops serving within a second, whatever is open. Streams
// first: Shutdown does not know of them (their connections were
// hijacked), and they must not wait behind it. Then Shutdown closes the
// listener and idle connections, and waits for running requests;
// connections that never sent a request it would wait 5 s for, so they
// are closed here. Then no change comes but from expiries: they stop,
// and the data files (closed after) take what is left and make it
// durable.
func (l *listener) shutdown(srv *server) {
	srv.health.Store(healthStopping)
	srv.close()
	ctx, cancel := context.WithTimeout(context.Background(), 800*time.Millisecond)
	defer cancel()
	shut := make(chan error, 1)
	go func() { shut <- l.hs.Shutdown(ctx) }()
	l.fresh.closeAll()
	if err := <-shut; err != nil {
		srv.log.Warn("shutdown timed out; closing the remaining connections", "err", err)
		l.hs.Close()
	}
	<-l.served
	srv.store.expiry.stop()
	srv.log.Info("stopped")
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
