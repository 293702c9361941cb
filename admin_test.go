package main

import (
	"bufio"
	"context"
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
	for i, b := range buckets {
		if i > 0 && buckets[i-1].name == b.name && b.value < buckets[i-1].value {
			t.Errorf("%s%s = %v, less than the bucket before: not cumulative", b.name, b.labels, b.value)
		}
		if b.labels == `{le="+Inf"}` {
			if count := samples[strings.TrimSuffix(b.name, "_bucket")+"_count"]; count != b.value {
				t.Errorf("%s +Inf bucket %v; count %v", b.name, b.value, count)
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
