package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http/httptest"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// promSample is one sample of a scrape: its name with labels, and value.
type promSample struct {
	name, labels string
	value        float64
}

var (
	promName   = regexp.MustCompile(`^[a-zA-Z_:][a-zA-Z0-9_:]*$`)
	promLine   = regexp.MustCompile(`^([^{ ]+)(\{[^}]*\})? (\S+)$`)
	promLe     = regexp.MustCompile(`,?le="[^"]*"`)
	promLabels = regexp.MustCompile(`^\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*\}$`)
)

// parseProm parses the Prometheus text format strictly enough to catch
// what a scraper would refuse: every sample's metric has a # TYPE before
// it, names and labels are well-formed, values are numbers, and each
// histogram's buckets are cumulative and end in +Inf equal to its count.
// It returns the samples by name{labels}.
func parseProm(t *testing.T, text string) map[string]float64 {
	t.Helper()
	types := map[string]string{}
	samples := map[string]float64{}
	var buckets []promSample
	for n, line := range strings.Split(strings.TrimSuffix(text, "\n"), "\n") {
		if rest, ok := strings.CutPrefix(line, "# TYPE "); ok {
			f := strings.Fields(rest)
			if len(f) != 2 || !promName.MatchString(f[0]) || !strings.Contains(" counter gauge histogram summary untyped ", " "+f[1]+" ") {
				t.Errorf("line %d: bad TYPE: %q", n+1, line)
				continue
			}
			types[f[0]] = f[1]
			continue
		}
		if strings.HasPrefix(line, "# HELP ") || line == "" {
			continue
		}
		m := promLine.FindStringSubmatch(line)
		if m == nil || !promName.MatchString(m[1]) || (m[2] != "" && !promLabels.MatchString(m[2])) {
			t.Errorf("line %d: not a sample: %q", n+1, line)
			continue
		}
		v, err := strconv.ParseFloat(m[3], 64)
		if err != nil {
			t.Errorf("line %d: value %q: %v", n+1, m[3], err)
		}
		base := m[1]
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if b, ok := strings.CutSuffix(m[1], suffix); ok && (types[b] == "histogram" || types[b] == "summary") {
				base = b
			}
		}
		if types[base] == "" {
			t.Errorf("line %d: %s has no # TYPE before it", n+1, m[1])
		}
		if strings.HasSuffix(m[1], "_bucket") {
			buckets = append(buckets, promSample{m[1], m[2], v})
		}
		samples[m[1]+m[2]] = v
	}
	// A histogram's series: its name and labels but le.
	series := func(b promSample) string {
		labels := strings.Replace(promLe.ReplaceAllString(b.labels, ""), "{,", "{", 1)
		if labels == "{}" {
			labels = ""
		}
		return strings.TrimSuffix(b.name, "_bucket") + labels
	}
	for i, b := range buckets {
		if i > 0 && series(buckets[i-1]) == series(b) && b.value < buckets[i-1].value {
			t.Errorf("%s%s = %v, less than the bucket before: not cumulative", b.name, b.labels, b.value)
		}
		if strings.Contains(b.labels, `le="+Inf"`) {
			name, labels, _ := strings.Cut(series(b), "{")
			if labels != "" {
				labels = "{" + labels
			}
			if count := samples[name+"_count"+labels]; count != b.value {
				t.Errorf("%s%s +Inf bucket %v; count %v", b.name, b.labels, b.value, count)
			}
		}
	}
	return samples
}

// scrape fetches /metrics from an admin handler and parses it.
func scrape(t *testing.T, admin string) map[string]float64 {
	t.Helper()
	resp := do(t, "GET", admin+"/metrics", "")
	if resp.code != 200 || !strings.HasPrefix(resp.header.Get("Content-Type"), "text/plain; version=0.0.4") {
		t.Fatalf("/metrics: %d %s", resp.code, resp.header.Get("Content-Type"))
	}
	return parseProm(t, resp.body)
}

// TestMetrics scrapes /metrics before and after a known mix of requests:
// each counter moves by exactly what the mix should have made it move.
func TestMetrics(t *testing.T) {
	srv, url := newTestServer(t, "-max-value-bytes", "100", "-max-keys", "6")
	admin := httptest.NewServer(srv.adminRoutes())
	t.Cleanup(admin.Close)
	before := scrape(t, admin.URL)

	requests := 0
	req := func(method, path, body string, want int, headers ...string) {
		t.Helper()
		requests++
		if got := do(t, method, url+path, body, headers...); got.code != want {
			t.Fatalf("%s %s: %d %s; want %d", method, path, got.code, got.body, want)
		}
	}
	stream, _ := openStream(t, url, "/m/")
	requests++
	req("POST", "/m/a", "1", 200)
	req("POST", "/m/a", "2", 200)
	req("POST", "/m/b", `"b"`, 200)
	req("PUT", "/m/a", "3", 409, "X-Revision", "0")
	req("PUT", "/m/a", "3", 200, "X-Revision", "2")
	req("POST", "/m/c", "{not json", 400)
	req("POST", "/m/c", `"`+strings.Repeat("x", 200)+`"`, 413)
	for i := range 4 { // 6 keys with /m/a and /m/b: the 5th is full
		req("POST", fmt.Sprintf("/f/%d", i), "0", 200)
	}
	req("POST", "/f/full", "0", 507)
	req("DELETE", "/m/b", "", 200)
	req("DELETE", "/f/0", "", 200)
	req("DELETE", "/nothing", "", 200) // deleted nothing: a write, not a delete
	req("POST", "/m/t?ttl=30ms", "9", 200)
	req("GET", "/m/a", "", 200)
	req("GET", "/m/", "", 200)
	ws := dialWS(t, url, "")
	requests++
	ws.roundTrip(`{"type":"set","payload":{"key":"m/w","value":1},"id":1}`, `{"type":"ok","payload":{"key":"m/w","revision":0},"id":1}`)
	ws.roundTrip(`{"type":"update","payload":{"key":"m/w","value":2,"revision":0},"id":2}`, `{"type":"conflict","payload":{"key":"m/w","value":1,"revision":0},"id":2}`)
	ws.roundTrip(`{"type":"update","payload":{"key":"m/w","value":2},"id":3}`, `{"type":"error","payload":"update: missing \"revision\": the revision the write will have (0 to create)","id":3}`)
	ws.roundTrip(`{"type":"set","payload":{"key":"m/w","value":"`+strings.Repeat("x", 200)+`"},"id":4}`, `{"type":"error","payload":"value larger than 100 bytes","id":4}`)
	ws.roundTrip(`{"type":"delete","payload":{"key":"m/w"},"id":5}`, `{"type":"ok","payload":{"key":"m/w"},"id":5}`)
	waitFor(t, "/m/t to expire", func() bool { return srv.store.Get("/m/t") == nil && srv.store.expiries.Load() > 0 })
	// The stream's changes under /m/: a×3, b, b deleted, t, t expired, w, w deleted.
	// Read until both last changes (w deleted, t expired) have come.
	const changes = 9
	for got, last := 0, 0; last < 2; got++ {
		ev := next(t, stream)
		if ev.data == "null" && (strings.HasPrefix(ev.id, "/m/w:") || strings.HasPrefix(ev.id, "/m/t:")) {
			last++
		}
		if got == changes {
			t.Fatalf("more events than changes: %v", ev)
		}
	}

	after := scrape(t, admin.URL)
	for name, want := range map[string]float64{
		`atomkv_writes_total{result="ok"}`:          3 + 1 + 4 + 3 + 1 + 2, // POST, PUT, POST /f, DELETE, ttl; WebSocket set, delete
		`atomkv_writes_total{result="conflict"}`:    2,
		`atomkv_writes_total{result="bad_request"}`: 2,
		`atomkv_writes_total{result="too_large"}`:   2,
		`atomkv_writes_total{result="full"}`:        1,
		`atomkv_writes_total{result="denied"}`:      0,
		`atomkv_deletes_total`:                      3,
		`atomkv_expiries_total`:                     1,
		`atomkv_keys`:                               4, // /m/a, /f/1, /f/2, /f/3
		`atomkv_stored_bytes`:                       float64(len("/m/a3/f/10/f/20/f/30")),
		`atomkv_open_streams`:                       1,
		`atomkv_open_websockets`:                    1,
		`atomkv_request_duration_seconds_count`:     float64(requests),
		`atomkv_events_sent_total`:                  -1, // see below
	} {
		if want < 0 {
			continue
		}
		if got := after[name] - before[name]; got != want {
			t.Errorf("%s moved by %v; want %v", name, got, want)
		}
	}
	sent := after["atomkv_events_sent_total"] - before["atomkv_events_sent_total"]
	coalesced := after["atomkv_events_coalesced_total"] - before["atomkv_events_coalesced_total"]
	if sent+coalesced != changes || sent < 1 {
		t.Errorf("events sent %v + coalesced %v; want %d changes in all", sent, coalesced, changes)
	}
	if _, ok := after["atomkv_data_log_bytes"]; ok {
		t.Error("data-file metrics without -data")
	}

	// With -data, the data files' figures.
	srv, url = newTestServer(t, "-data", t.TempDir(), "-fsync", "always")
	admin = httptest.NewServer(srv.adminRoutes())
	t.Cleanup(admin.Close)
	before = scrape(t, admin.URL)
	do(t, "POST", url+"/d", "1")
	after = scrape(t, admin.URL)
	for _, name := range []string{"atomkv_data_log_bytes", "atomkv_fsync_duration_seconds_count"} {
		if after[name] <= before[name] {
			t.Errorf("%s went from %v to %v after a write with -data -fsync always; want it up", name, before[name], after[name])
		}
	}
}

// TestAdminEndpoints: the admin listener answers /healthz, /debug/vars
// and /debug/pprof/; on the main listener those paths are keys like any.
func TestAdminEndpoints(t *testing.T) {
	url, admin := startWithAdmin(t)
	for path, want := range map[string]string{
		"/healthz":       "ok\n",
		"/debug/vars":    `"memstats":`,
		"/debug/pprof/":  "goroutine",
		"/metrics":       "# TYPE atomkv_keys gauge",
		"/debug/pprof/a": "Unknown profile",
	} {
		got := do(t, "GET", admin+path, "")
		if !strings.Contains(got.body, want) {
			t.Errorf("admin %s: %d %.80q; want %q", path, got.code, got.body, want)
		}
	}
	for _, path := range []string{"/healthz", "/metrics", "/debug/vars"} {
		if got := do(t, "GET", url+path, ""); got.code != 404 || errorMessage(got) != "no such key" {
			t.Errorf("main %s: %d %s; want 404, no such key", path, got.code, got.body)
		}
	}
	if got := do(t, "GET", url+"/debug/pprof/", ""); got.code != 200 || got.body != "[]" {
		t.Errorf("main /debug/pprof/: %d %s; want the empty listing of that prefix", got.code, got.body)
	}
}

// TestHealthWhileLoading: the admin listener is up before the data files
// load, and /healthz says 503 "loading" until the server serves. The
// test holds the server at its next log line by not reading its log.
func TestHealthWhileLoading(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"-addr", "127.0.0.1:0", "-admin-addr", "127.0.0.1:0", "-data", dir}, func(string) string { return "" }, pw)
		pw.Close()
	}()
	t.Cleanup(func() {
		go io.Copy(io.Discard, pr) // the server may be waiting to log
		cancel()
		<-done
	})
	lines := bufio.NewScanner(pr)
	line := func() string {
		if !lines.Scan() {
			t.Fatalf("the server's log ended: %v", <-done)
		}
		return lines.Text()
	}
	first := line()
	m := regexp.MustCompile(`msg="admin listening" addr=(\S+)`).FindStringSubmatch(first)
	if m == nil {
		t.Fatalf("first log line %q; want the admin listener, before the data loads", first)
	}
	admin := "http://" + m[1]
	if got := do(t, "GET", admin+"/healthz", ""); got.code != 503 || got.body != "loading\n" {
		t.Errorf("/healthz while loading: %d %q; want 503 loading", got.code, got.body)
	}
	if l := line(); !strings.Contains(l, "data loaded") {
		t.Errorf("log %q; want data loaded", l)
	}
	if l := line(); !strings.Contains(l, "msg=listening") {
		t.Errorf("log %q; want listening", l)
	}
	go io.Copy(io.Discard, pr)
	waitFor(t, "/healthz to say ok", func() bool { return do(t, "GET", admin+"/healthz", "").code == 200 })
}

// startWithAdmin runs the server with -admin-addr and returns both URLs.
func startWithAdmin(t *testing.T, args ...string) (url, admin string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, append([]string{"-addr", "127.0.0.1:0", "-admin-addr", "127.0.0.1:0"}, args...), func(string) string { return "" }, pw)
		pw.Close()
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
	})
	addr := regexp.MustCompile(`msg=(listening|"admin listening") addr=(\S+)`)
	sc := bufio.NewScanner(pr)
	for (url == "" || admin == "") && sc.Scan() {
		if m := addr.FindStringSubmatch(sc.Text()); m != nil && m[1] == "listening" {
			url = "http://" + m[2]
		} else if m != nil {
			admin = "http://" + m[2]
		}
	}
	go io.Copy(io.Discard, pr)
	if url == "" || admin == "" {
		t.Fatalf("server did not start: %v", <-done)
	}
	waitFor(t, "the server to serve", func() bool { return do(t, "GET", admin+"/healthz", "").code == 200 })
	return url, admin
}

// TestLogFormat: -log-format json logs one JSON object per line.
func TestLogFormat(t *testing.T) {
	var out strings.Builder
	ctx, cancel := context.WithTimeout(context.Background(), time.Millisecond)
	defer cancel()
	<-ctx.Done()
	if err := run(ctx, []string{"-addr", "127.0.0.1:0", "-log-format", "json"}, func(string) string { return "" }, &out); err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		if !strings.HasPrefix(line, `{"time":`) || !strings.HasSuffix(line, "}") {
			t.Errorf("log line %q; want JSON", line)
		}
	}
	if !strings.Contains(out.String(), `"msg":"listening"`) {
		t.Errorf("log %q; want the listening line", out.String())
	}
	if _, err := parseConfig([]string{"-log-format", "xml"}, func(string) string { return "" }, io.Discard); err == nil {
		t.Error("-log-format xml: no error")
	}
}

// clusterStateOf reads a node's GET /cluster from its admin listener.
func clusterStateOf(t *testing.T, admin string) clusterState {
	t.Helper()
	r := mustDo(t, 200, "GET", admin+"/cluster", "")
	var st clusterState
	if err := json.Unmarshal([]byte(r.body), &st); err != nil {
		t.Fatalf("/cluster: %s: %v", r.body, err)
	}
	return st
}

// TestClusterMetrics: a node's /metrics and /cluster on a real etcd of
// three members, read before and after each step, move as the step
// should make them: writes and reads counted by kind, without an error;
// each refusal counted by its kind; a second node cut off while etcd
// compacts resyncs once; the member under the node's watch killed: the
// watch reconnects through another, requests tried there first are sent
// again, and no request fails; the quorum lost: reads fail as
// unavailable and the node is unhealthy until etcd is back.
func TestClusterMetrics(t *testing.T) {
	t.Parallel()
	c := startEtcd(t, 3)
	prefix := newPrefix()
	// The node prefers a follower, whose loss costs no election.
	follower := (c.leader() + 1) % 3
	eps := c.endpoints()
	var others []int
	for i := range eps {
		if i != follower {
			others = append(others, i)
		}
	}
	n := startNode(t, []string{eps[follower], eps[others[0]], eps[others[1]]}, prefix, "-write-timeout", "2s")
	admin := httptest.NewServer(n.srv.adminRoutes())
	t.Cleanup(admin.Close)
	waitFor(t, "the node healthy", func() bool { return n.health().code == 200 })
	trips := func(kind string) string { return `atomkv_etcd_request_duration_seconds_count{kind="` + kind + `"}` }
	errs := func(label string) string { return `atomkv_etcd_errors_total{error="` + label + `"}` }
	// moved checks how far each metric moved between two scrapes: by
	// exactly want, or (atLeast) by want or more.
	type move struct {
		metric  string
		want    float64
		atLeast bool
	}
	moved := func(step string, before, after map[string]float64, moves ...move) {
		t.Helper()
		for _, m := range moves {
			if _, ok := after[m.metric]; !ok {
				t.Errorf("%s: no %s in /metrics", step, m.metric)
				continue
			}
			got := after[m.metric] - before[m.metric]
			if got != m.want && !(m.atLeast && got > m.want) {
				at := ""
				if m.atLeast {
					at = " or more"
				}
				t.Errorf("%s: %s moved by %v; want %v%s", step, m.metric, got, m.want, at)
			}
		}
	}
	noErrors := func() []move {
		var m []move
		for _, e := range etcdErrorNames {
			m = append(m, move{errs(e), 0, false})
		}
		return m
	}
	lagged := func(m map[string]float64) {
		t.Helper()
		if lag := m["atomkv_etcd_watch_lag_revisions"]; lag < 0 || lag != max(0, m["atomkv_etcd_revision"]-m["atomkv_etcd_applied_revision"]) {
			t.Errorf("lag %v; etcd's revision %v, applied %v", lag, m["atomkv_etcd_revision"], m["atomkv_etcd_applied_revision"])
		}
	}

	// Writes and reads: each request its round trip, by kind.
	before := scrape(t, admin.URL)
	for i := range 3 {
		mustDo(t, 200, "POST", n.url+fmt.Sprintf("/m/%d", i), `1`)
	}
	mustDo(t, 200, "DELETE", n.url+"/m/2", "")
	mustDo(t, 200, "PUT", n.url+"/m/0", `2`, "X-Revision", "1")
	txn := mustDo(t, 200, "POST", n.url+"/", `{"ops":[{"op":"set","key":"/m/a","value":1},{"op":"set","key":"/m/b","value":1}]}`)
	for range 5 {
		mustDo(t, 200, "GET", n.url+"/m/0", "")
	}
	after := scrape(t, admin.URL)
	moved("writes and reads", before, after, append(noErrors(),
		move{trips("put"), 3, false}, move{trips("delete"), 1, false}, move{trips("txn"), 2, false},
		move{trips("lease"), 0, false}, move{trips("range"), 1, true},
		move{"atomkv_etcd_read_rounds_total", 1, true}, move{"atomkv_etcd_retries_total", 0, false})...)
	seq, _ := strconv.ParseInt(txn.header.Get("X-Seq"), 10, 64)
	if after["atomkv_etcd_revision"] < float64(seq) || after["atomkv_etcd_applied_revision"] < float64(seq) {
		t.Errorf("after a write at revision %d: etcd's revision %v, applied %v; want both at least that",
			seq, after["atomkv_etcd_revision"], after["atomkv_etcd_applied_revision"])
	}
	if after["atomkv_etcd_healthy"] != 1 {
		t.Errorf("atomkv_etcd_healthy %v; want 1", after["atomkv_etcd_healthy"])
	}
	lagged(after)
	waitFor(t, "no lag once the view caught up", func() bool {
		m := scrape(t, admin.URL)
		return m["atomkv_etcd_watch_lag_revisions"] == 0
	})

	// Refusals, through the node's own client: each counted by its kind.
	j := n.srv.cluster
	ctx := etcdCtx(t)
	before = scrape(t, admin.URL)
	if err := j.c.leaseRevoke(ctx, 1); !errors.Is(err, errEtcdLeaseNotFound) {
		t.Errorf("revoking lease 1: %v; want %v", err, errEtcdLeaseNotFound)
	}
	tooMany := etcdTxn{Compare: make([]etcdCompare, 129)}
	for i := range tooMany.Compare {
		tooMany.Compare[i] = etcdCompare{Target: "VERSION", Key: []byte("/elsewhere"), Version: 1}
	}
	if _, err := j.c.txn(ctx, tooMany); !errors.Is(err, errEtcdTooManyOps) {
		t.Errorf("a txn of 129 compares: %v; want %v", err, errEtcdTooManyOps)
	}
	big := etcdTxn{Success: []etcdOp{{Put: &etcdPut{Key: []byte("/elsewhere"), Value: make([]byte, 2<<20)}}}}
	if _, err := j.c.txn(ctx, big); !errors.Is(err, errEtcdTooLarge) {
		t.Errorf("a put of 2 MiB: %v; want %v", err, errEtcdTooLarge)
	}
	twice := etcdTxn{Success: []etcdOp{{Put: &etcdPut{Key: []byte("/elsewhere")}}, {Put: &etcdPut{Key: []byte("/elsewhere")}}}}
	if _, err := j.c.txn(ctx, twice); !errors.Is(err, errEtcdDuplicateKey) {
		t.Errorf("a txn writing a key twice: %v; want %v", err, errEtcdDuplicateKey)
	}
	compactAt(t, c, seq)
	if _, err := j.c.rangeKeys(ctx, etcdRange{Key: []byte("/elsewhere"), Revision: 1}); !errors.Is(err, errEtcdCompacted) {
		t.Errorf("a range at revision 1 after a compaction: %v; want %v", err, errEtcdCompacted)
	}
	after = scrape(t, admin.URL)
	moved("refusals", before, after, move{errs("lease_not_found"), 1, false}, move{errs("too_many_ops"), 1, false},
		move{errs("too_large"), 1, false}, move{errs("other"), 1, false}, move{errs("compacted"), 1, false},
		move{errs("unavailable"), 0, false}, move{errs("outcome_unknown"), 0, false}, move{"atomkv_etcd_retries_total", 0, false})
	if st := clusterStateOf(t, admin.URL); st.LastError == nil || !strings.Contains(st.LastError.Error, "compacted") {
		t.Errorf("/cluster's last error after a range of a compacted revision: %+v", st.LastError)
	}

	// A second node, through a proxy, cut off while the prefix changes
	// and etcd compacts its history: it reads the prefix again, once.
	p := newEtcdProxy(t, c, others[0])
	m := startNode(t, []string{p.url}, prefix)
	madmin := httptest.NewServer(m.srv.adminRoutes())
	t.Cleanup(madmin.Close)
	before = scrape(t, madmin.URL)
	p.cutOff()
	mustDo(t, 200, "POST", n.url+"/m/cut", `1`)
	compactAt(t, c, etcdPutAll(t, c.newClient(), "/elsewhere", "1"))
	p.cut.Store(false)
	waitFor(t, "the node cut off to resync", func() bool {
		return scrape(t, madmin.URL)["atomkv_etcd_resyncs_total"] == before["atomkv_etcd_resyncs_total"]+1
	})
	after = scrape(t, madmin.URL)
	moved("a resync", before, after, move{"atomkv_etcd_watch_reconnects_total", 1, true}, move{"atomkv_etcd_resyncs_total", 1, false})
	lagged(after)

	// The member under the node's watch killed: the watch reopens through
	// another; what was tried there first goes again; nothing fails.
	if st := clusterStateOf(t, admin.URL); st.Watch != eps[follower] || st.Requests != eps[follower] || !st.Healthy {
		t.Fatalf("/cluster before a member is killed: %+v; want the watch and requests on %s, healthy", st, eps[follower])
	}
	before = scrape(t, admin.URL)
	c.kill(follower)
	waitFor(t, "the watch on another member", func() bool {
		st := clusterStateOf(t, admin.URL)
		return st.Watch != "" && st.Watch != eps[follower] && st.Healthy
	})
	mustDo(t, 200, "POST", n.url+"/m/after", `1`)
	mustDo(t, 200, "GET", n.url+"/m/after", "")
	after = scrape(t, admin.URL)
	moved("a member killed", before, after, move{"atomkv_etcd_watch_reconnects_total", 1, true},
		move{"atomkv_etcd_retries_total", 1, true}, move{errs("unavailable"), 0, false}, move{errs("outcome_unknown"), 0, false})
	st := clusterStateOf(t, admin.URL)
	if st.Endpoints[0].URL != eps[follower] || st.Endpoints[0].Failures == 0 || st.LastError == nil {
		t.Errorf("/cluster after %s was killed: %+v; want its failures counted, and a last error", eps[follower], st)
	}

	// The quorum lost: a read fails as unavailable, the node is
	// unhealthy; back once etcd is.
	before = after
	c.kill(others[0])
	if r := do(t, "GET", n.url+"/m/after", ""); r.code != 503 {
		t.Errorf("GET without a quorum: %d %s; want 503", r.code, r.body)
	}
	waitFor(t, "atomkv_etcd_healthy 0", func() bool { return scrape(t, admin.URL)["atomkv_etcd_healthy"] == 0 })
	if clusterStateOf(t, admin.URL).Healthy {
		t.Errorf("/cluster says healthy without a quorum")
	}
	// The GET's 503 may have come from the node's knowing its watch
	// closed, before any request failed; the watchdog's next round, at
	// the latest, fails as unavailable.
	waitFor(t, "an unavailable etcd counted", func() bool {
		return scrape(t, admin.URL)[errs("unavailable")] > before[errs("unavailable")]
	})
	after = scrape(t, admin.URL)
	moved("the quorum lost", before, after, move{errs("unavailable"), 1, true})
	c.start(follower, others[0])
	waitFor(t, "atomkv_etcd_healthy 1", func() bool { return scrape(t, admin.URL)["atomkv_etcd_healthy"] == 1 })
	mustDo(t, 200, "GET", n.url+"/m/after", "")
	lagged(scrape(t, admin.URL))
}
