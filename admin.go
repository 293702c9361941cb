// The admin listener (-admin-addr): what an operator needs, on a port of
// its own so that no key can collide with it. /healthz for load
// balancers, /metrics in the Prometheus text format (written by hand:
// standard library only), /debug/vars (expvar) and /debug/pprof/, on a
// node of a cluster /cluster (its etcd, as JSON), and at / the console,
// a page that shows the store live.
//
// The counters are atomics that requests and writers add to; nothing on
// a request's path takes a lock for them.

package main

import (
	"bufio"
	_ "embed"
	"encoding/json"
	"errors"
	"expvar"
	"fmt"
	"html"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// adminRoutes returns the handler of the admin listener.
func (s *server) adminRoutes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", s.handleConsole)
	mux.HandleFunc("GET /healthz", s.handleHealth)
	mux.HandleFunc("GET /metrics", s.handleMetrics)
	mux.HandleFunc("GET /cluster", s.handleCluster)
	mux.Handle("GET /debug/vars", expvar.Handler())
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

//go:embed console.html
var consoleHTML string

// handleConsole answers the console: one page that loads client.js from
// the main listener and shows its keys live, with /metrics of this
// listener as sparklines, and on a node its etcd (/cluster). The page
// takes the main listener's URL from its ?server= query, or else from
// mainURL.
func (s *server) handleConsole(w http.ResponseWriter, r *http.Request) {
	page := strings.NewReplacer(
		"{{MAIN}}", html.EscapeString(s.mainURL(r)),
		"{{TOKENS}}", strconv.FormatBool(s.access != nil),
		"{{NODE}}", strconv.FormatBool(s.cluster != nil),
	).Replace(consoleHTML)
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("X-Frame-Options", "SAMEORIGIN") // no page elsewhere may frame it and steer its clicks
	io.WriteString(w, page)
}

// mainURL guesses the main listener's URL for a console page reached by
// r: -addr, on the host the page was reached by where -addr names none.
func (s *server) mainURL(r *http.Request) string {
	host, port, err := net.SplitHostPort(s.cfg.addr)
	if err != nil {
		return ""
	}
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		if h, _, err := net.SplitHostPort(r.Host); err == nil {
			host = h
		} else {
			host = r.Host
		}
	}
	return "http://" + net.JoinHostPort(host, port)
}

// handleHealth answers 200 "ok" while the server serves; 503 while it
// loads its data files (-data), and once it is stopping, so that a load
// balancer sends it nothing new.
func (s *server) handleHealth(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	switch s.health.Load() {
	case healthServing:
		if s.cluster != nil && !s.cluster.healthy.Load() {
			// A node whose watch is down cannot keep its view current.
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, "etcd out of reach: the view is not current\n")
			return
		}
		io.WriteString(w, "ok\n")
	case healthStopping:
		w.WriteHeader(http.StatusServiceUnavailable)
		io.WriteString(w, "stopping\n")
	default:
		w.WriteHeader(http.StatusServiceUnavailable)
		io.WriteString(w, "loading\n")
	}
}

// clusterState is what GET /cluster answers: a node's etcd, as the
// console shows it.
type clusterState struct {
	Prefix     string            `json:"prefix"`
	Endpoints  []clusterEndpoint `json:"endpoints"`
	Requests   string            `json:"requests"` // the member the next request goes to first
	Watch      string            `json:"watch"`    // the member the watch is open on; "" while none is
	Healthy    bool              `json:"healthy"`
	Revision   int64             `json:"revision"` // etcd's, as far as the node knows
	Applied    int64             `json:"applied"`
	Lag        int64             `json:"lag"`
	Reconnects int64             `json:"watch_reconnects"`
	Resyncs    int64             `json:"resyncs"`
	LastError  *etcdLastError    `json:"last_error"` // null: none since the start
}

// A clusterEndpoint is an etcd member as the node's client sees it: Down
// after Failures in a row, until its pause ends (tried after the others).
type clusterEndpoint struct {
	URL      string `json:"url"`
	Down     bool   `json:"down"`
	Failures int32  `json:"failures"`
}

// handleCluster answers a node's etcd state as JSON (clusterState), for
// the console; 404 on a server that is not a node (no -etcd).
func (s *server) handleCluster(w http.ResponseWriter, r *http.Request) {
	j := s.cluster
	if j == nil {
		serveError(w, http.StatusNotFound, "not a node of a cluster (no -etcd)")
		return
	}
	st := &j.c.stats
	state := clusterState{
		Prefix: j.prefix, Requests: j.c.endpoint(), Healthy: j.healthy.Load(),
		Revision: st.revision.Load(), Applied: j.appliedAt(),
		Reconnects: j.reconnects.Load(), Resyncs: j.resyncs.Load(), LastError: st.last.Load(),
	}
	state.Lag = max(0, state.Revision-state.Applied)
	now := time.Now().UnixNano()
	for i, u := range j.c.endpoints {
		state.Endpoints = append(state.Endpoints, clusterEndpoint{u, j.c.down[i].Load() > now, j.c.fails[i].Load()})
	}
	j.mu.Lock()
	if j.watch != nil {
		state.Watch = j.watch.endpoint
	}
	j.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-cache")
	json.NewEncoder(w).Encode(state)
}

// The states /healthz reports.
const (
	healthLoading int32 = iota
	healthServing
	healthStopping
)

// Results of a write, the label of atomkv_writes_total.
const (
	resultOK = iota
	resultConflict
	resultBadRequest
	resultTooLarge
	resultFull
	resultDenied
	resultUnavailable
	results
)

var resultNames = [results]string{"ok", "conflict", "bad_request", "too_large", "full", "denied", "unavailable"}

// The errors a request to etcd ends with, by why: the error label of
// atomkv_etcd_errors_total.
const (
	etcdErrUnavailable = iota
	etcdErrOutcomeUnknown
	etcdErrTooLarge
	etcdErrTooManyOps
	etcdErrCompacted
	etcdErrLeaseNotFound
	etcdErrOther // another refusal (a key twice in a txn, permission), an encoding error
	etcdErrs
)

var etcdErrorNames = [etcdErrs]string{"unavailable", "outcome_unknown", "too_large", "too_many_ops", "compacted", "lease_not_found", "other"}

// etcdErrorOf is err's label in atomkv_etcd_errors_total.
func etcdErrorOf(err error) int {
	for _, e := range []struct {
		err   error
		label int
	}{
		{errOutcomeUnknown, etcdErrOutcomeUnknown}, // first: what a member said, which it wraps, may match another
		{errEtcdUnavailable, etcdErrUnavailable},
		{errEtcdTooLarge, etcdErrTooLarge},
		{errEtcdTooManyOps, etcdErrTooManyOps},
		{errEtcdCompacted, etcdErrCompacted},
		{errEtcdLeaseNotFound, etcdErrLeaseNotFound},
	} {
		if errors.Is(err, e.err) {
			return e.label
		}
	}
	return etcdErrOther
}

// metrics are the counters the server keeps for /metrics. The store's own
// figures (keys, bytes, deletes, expiries) and the data files' live in
// Store and dataDir, and are read when scraped.
type metrics struct {
	writes          [results]atomic.Int64
	sse, ws         atomic.Int64 // open event streams and WebSockets
	wsSilent        atomic.Int64 // WebSockets closed for not answering a ping
	eventsSent      atomic.Int64
	eventsCoalesced atomic.Int64
	requests        histogram
}

// wrote counts a write that ended with err; see writeResult.
func (m *metrics) wrote(err error) { m.writes[writeResult(err)].Add(1) }

// writeResult is the atomkv_writes_total label of a write that ended
// with err: its outcome's (see outcomeTable).
func writeResult(err error) int { return outcomeTable[outcomeOf(err)].result }

// histogram counts durations into fixed buckets, Prometheus style. Each
// observation is two atomic adds.
type histogram struct {
	counts [len(latencyBounds) + 1]atomic.Int64 // per bucket, not cumulative; the last is +Inf
	sum    atomic.Int64                         // nanoseconds
}

// latencyBounds are the buckets' upper bounds, from 100 µs to 10 s.
var latencyBounds = [...]time.Duration{
	100 * time.Microsecond, 250 * time.Microsecond, 500 * time.Microsecond,
	time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond,
	10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond,
	100 * time.Millisecond, 250 * time.Millisecond, 500 * time.Millisecond,
	time.Second, 2500 * time.Millisecond, 5 * time.Second, 10 * time.Second,
}

func (h *histogram) observe(d time.Duration) {
	i := 0
	for i < len(latencyBounds) && d > latencyBounds[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sum.Add(int64(d))
}

// observe times every request of the main listener. An event stream or
// WebSocket is timed until it is set up: its handler hands the connection
// over and returns. Writes are counted, by outcome, where their route is
// known (dispatch).
func (s *server) observe(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		next.ServeHTTP(w, r)
		s.metrics.requests.observe(time.Since(start))
	})
}

// handleMetrics answers the metrics in the Prometheus text format
// (version 0.0.4).
func (s *server) handleMetrics(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	b := bufio.NewWriter(w)
	defer b.Flush()
	m := &s.metrics
	metric := func(name, kind, help string) {
		fmt.Fprintf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, kind)
	}
	single := func(name, kind, help string, v int64) { // a metric of one sample
		metric(name, kind, help)
		fmt.Fprintf(b, "%s %d\n", name, v)
	}

	single("atomkv_keys", "gauge", "Keys holding a value.", s.store.Len())
	single("atomkv_stored_bytes", "gauge", "Bytes of the keys and values held.", s.store.liveBytes.Load())
	metric("atomkv_writes_total", "counter", "Writes (HTTP POST, PUT, DELETE; WebSocket set, update, delete; KvServer REST POST, DELETE), by result.")
	for i, name := range resultNames {
		fmt.Fprintf(b, "atomkv_writes_total{result=%q} %d\n", name, m.writes[i].Load())
	}
	single("atomkv_deletes_total", "counter", "Keys deleted.", s.store.deletes.Load())
	single("atomkv_expiries_total", "counter", "Keys that expired.", s.store.expiries.Load())
	single("atomkv_open_streams", "gauge", "Open event streams (Server-Sent Events).", m.sse.Load())
	single("atomkv_open_websockets", "gauge", "Open WebSocket connections.", m.ws.Load())
	single("atomkv_websockets_silent_total", "counter", "WebSockets closed for answering nothing to a ping within -write-timeout.", m.wsSilent.Load())
	single("atomkv_events_sent_total", "counter", "Events written to event streams and WebSockets.", m.eventsSent.Load())
	single("atomkv_events_coalesced_total", "counter", "Events replaced, before they were sent, by a newer one of their key.", m.eventsCoalesced.Load())

	metric("atomkv_request_duration_seconds", "histogram", "HTTP requests of the main listener, until answered (event streams and WebSockets: until set up).")
	m.requests.write(b, "atomkv_request_duration_seconds", "")

	if d, _ := s.store.journal.(*dataDir); d != nil {
		single("atomkv_data_log_bytes", "gauge", "Bytes of the current log file (-data).", d.logSize.Load())
		single("atomkv_data_snapshot_bytes", "gauge", "Bytes of the newest snapshot (-data).", d.snapBytes.Load())
		single("atomkv_data_snapshots_total", "counter", "Snapshots written since the server started (-data).", d.snapshots.Load())
		metric("atomkv_fsync_duration_seconds", "summary", "Time taken by fsync of the log (-data).")
		fmt.Fprintf(b, "atomkv_fsync_duration_seconds_sum %g\n", time.Duration(d.fsyncNanos.Load()).Seconds())
		fmt.Fprintf(b, "atomkv_fsync_duration_seconds_count %d\n", d.fsyncs.Load())
	}

	if j := s.cluster; j != nil {
		st := &j.c.stats
		metric("atomkv_etcd_request_duration_seconds", "histogram", "Round trips to etcd (each attempt; one sent again to another member is another), by what they were for, until answered or failed (-etcd).")
		for i, kind := range etcdTripNames {
			st.trips[i].write(b, "atomkv_etcd_request_duration_seconds", fmt.Sprintf("kind=%q,", kind))
		}
		metric("atomkv_etcd_errors_total", "counter", "Requests to etcd that failed, by why, after any attempts at other members (-etcd).")
		for i, name := range etcdErrorNames {
			fmt.Fprintf(b, "atomkv_etcd_errors_total{error=%q} %d\n", name, st.errors[i].Load())
		}
		single("atomkv_etcd_retries_total", "counter", "Attempts of requests to etcd that failed and were sent again, to the next member or after a pause (-etcd).", st.retries.Load())
		etcdRev, applied := st.revision.Load(), j.appliedAt()
		single("atomkv_etcd_revision", "gauge", "etcd's latest revision, as far as its answers and the watch told the node (-etcd).", etcdRev)
		single("atomkv_etcd_applied_revision", "gauge", "The revision up to which the node's view holds every change (-etcd).", applied)
		single("atomkv_etcd_watch_lag_revisions", "gauge", "How far the node's view is behind etcd: atomkv_etcd_revision - atomkv_etcd_applied_revision, at least 0 (-etcd).", max(0, etcdRev-applied))
		single("atomkv_etcd_watch_reconnects_total", "counter", "Watches of the prefix opened again after the first, the stream having ended, broken or stalled (-etcd).", j.reconnects.Load())
		single("atomkv_etcd_resyncs_total", "counter", "Reads of the whole prefix after etcd compacted the history the watch needed (-etcd).", j.resyncs.Load())
		single("atomkv_etcd_read_rounds_total", "counter", "Linearizable reads of etcd's revision, each shared by the reads that waited for it (-etcd).", j.reads.rounds.Load())
		single("atomkv_etcd_fence_rounds_total", "counter", "Fences written to learn that the watch is current, each shared by the reads that waited for it (-etcd).", j.fences.rounds.Load())
		healthy := int64(0)
		if j.healthy.Load() {
			healthy = 1
		}
		single("atomkv_etcd_healthy", "gauge", "1 while the node's watch is open and its view was last found current, else 0: what /healthz answers (-etcd).", healthy)
	}
}

// write writes h's samples as the Prometheus histogram name, each with
// labels ("" or `a="b",`) before its le.
func (h *histogram) write(w io.Writer, name, labels string) {
	var cum int64
	for i, bound := range latencyBounds {
		cum += h.counts[i].Load()
		fmt.Fprintf(w, "%s_bucket{%sle=%q} %d\n", name, labels, strconv.FormatFloat(bound.Seconds(), 'g', -1, 64), cum)
	}
	cum += h.counts[len(latencyBounds)].Load()
	fmt.Fprintf(w, "%s_bucket{%sle=\"+Inf\"} %d\n", name, labels, cum)
	if labels = strings.TrimSuffix(labels, ","); labels != "" {
		labels = "{" + labels + "}"
	}
	fmt.Fprintf(w, "%s_sum%s %g\n", name, labels, time.Duration(h.sum.Load()).Seconds())
	fmt.Fprintf(w, "%s_count%s %d\n", name, labels, cum)
}
