package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// TestConsolePage: the admin listener serves the console at / (only
// there: other paths are 404), with the main listener's URL and whether
// tokens are needed filled in.
func TestConsolePage(t *testing.T) {
	for _, tc := range []struct {
		args       []string
		host, main string
		tokens     string
	}{
		{[]string{"-addr", ":8000"}, "vm.example:9000", "http://vm.example:8000", "false"},
		{[]string{"-addr", "0.0.0.0:8001"}, "10.0.0.5:9000", "http://10.0.0.5:8001", "false"},
		{[]string{"-addr", "127.0.0.1:8000"}, "localhost:9000", "http://127.0.0.1:8000", "false"},
		{[]string{"-addr", "[::1]:8000", "-tokens", writeTokens(t, "t write /")}, "x:9", "http://[::1]:8000", "true"},
	} {
		cfg, err := parseConfig(tc.args, func(string) string { return "" }, io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		srv, err := newServer(cfg, discardLogger())
		if err != nil {
			t.Fatal(err)
		}
		admin := srv.adminRoutes()
		req := httptest.NewRequest("GET", "/", nil)
		req.Host = tc.host
		w := httptest.NewRecorder()
		admin.ServeHTTP(w, req)
		body := w.Body.String()
		if w.Code != 200 || w.Header().Get("Content-Type") != "text/html; charset=utf-8" || w.Header().Get("X-Frame-Options") != "SAMEORIGIN" {
			t.Errorf("%v: GET / on the admin listener: %d %s, X-Frame-Options %q", tc.args, w.Code, w.Header().Get("Content-Type"), w.Header().Get("X-Frame-Options"))
		}
		for _, want := range []string{
			`<meta name="atomkv-main" content="` + tc.main + `">`,
			`<meta name="atomkv-tokens" content="` + tc.tokens + `">`,
			`<meta name="atomkv-node" content="false">`,
		} {
			if !strings.Contains(body, want) {
				t.Errorf("%v, reached as %s: the page lacks %s", tc.args, tc.host, want)
			}
		}
		w = httptest.NewRecorder()
		admin.ServeHTTP(w, httptest.NewRequest("GET", "/console", nil))
		if w.Code != 404 {
			t.Errorf("GET /console on the admin listener: %d; want 404", w.Code)
		}
		srv.close()
	}
}

// TestConsole drives the console in headless Chromium, on a store of
// 200,000 keys. A harness page holds it in a frame of the same origin, so
// that it can read and click the console's DOM like a user: the first
// screen shows the children of /; keys written with plain HTTP show up
// with their revision and TTL, a change made elsewhere is highlighted, a
// compare-and-swap edit that loses shows the current value, deletes
// leave the list, a TTL is set, the figures come from /metrics; a prefix
// opens on a click and the crumbs lead back up; a long prefix comes a
// page at a time, in order; a write updates its row live, a new key
// takes its place if the pages loaded reach it (and not otherwise); a
// stream back after the history forgot it starts the view again rather
// than take the state of the prefix; with -tokens the console asks for a
// token and keeps it for the tab. The server watches only the prefix on
// screen for it, and it never reads anything whole: no listing without
// a limit, no stream with initial.
func TestConsole(t *testing.T) {
	chromium := needTool(t, "chromium", "chromium")
	// A short heartbeat, so that the server soon notices the streams of
	// the prefixes the console left; a short history, so that the page
	// can be away long enough to need a reset.
	srv, server, unbounded := newWatchedServer(t, "-heartbeat", "100ms", "-history", "100")
	guardedSrv, guarded := newTestServer(t, "-tokens", writeTokens(t, "console-token write /"))

	// 200,000 keys, through the store in key order: 200,000 HTTP requests
	// would take minutes.
	for i := range 200_000 {
		if _, err := srv.store.Set(fmt.Sprintf("/big/%06d", i), fmt.Sprintf(`{"n":%d}`, i), 0); err != nil {
			t.Fatal(err)
		}
	}
	// Written before the page opens, as curl would.
	for _, w := range []struct{ key, value, ttl string }{
		{"/console/a", `{"n": 1}`, ""},
		{"/console/b", `"theirs"`, ""},
		{"/console/c", `3`, ""},
		{"/console/d", `4`, ""},
		{"/console/deep/x", `[1, 2]`, ""},
		{"/console/t", `"brief"`, "90s"},
		{"/room/1/topic", `"one"`, ""},
		{"/room/2/a", `"ay"`, ""},
		{"/room/2/b", `"bee"`, ""},
		{"/room/2/c", `"see"`, ""},
		{"/room/3/x", `3`, ""},
	} {
		if r := do(t, "POST", server+w.key, w.value, "X-TTL", w.ttl); r.code != 200 {
			t.Fatalf("POST %s: %d %s", w.key, r.code, r.body)
		}
	}
	if r := do(t, "POST", guarded+"/room/x", `"guarded"`, "Authorization", "Bearer console-token"); r.code != 200 {
		t.Fatalf("POST with the token: %d %s", r.code, r.body)
	}

	harness, err := os.ReadFile("testdata/console.html")
	if err != nil {
		t.Fatal(err)
	}
	harness = bytes.ReplaceAll(harness, []byte("{{SERVER}}"), []byte(server))
	harness = bytes.ReplaceAll(harness, []byte("{{GUARDED}}"), []byte(guarded))
	mux := http.NewServeMux()
	mux.Handle("/", srv.adminRoutes())
	mux.Handle("/guarded/", http.StripPrefix("/guarded", guardedSrv.adminRoutes()))
	mux.HandleFunc("GET /harness", func(w http.ResponseWriter, r *http.Request) { w.Write(harness) })
	mux.HandleFunc("GET /subscribers", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, strconv.Itoa(subscribersOf(srv.store, r.URL.Query().Get("path"))))
	})
	// drop closes the server's streams of a path, as a network failure
	// would; churn makes changes until the history forgets.
	mux.HandleFunc("POST /drop", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, dropWatchers(srv, r.URL.Query().Get("path")))
	})
	mux.HandleFunc("POST /churn", func(w http.ResponseWriter, r *http.Request) {
		for i := range 1000 {
			srv.store.Set("/churn", strconv.Itoa(i), 0)
		}
	})
	// write makes a change elsewhere than in the console.
	mux.HandleFunc("POST /write", func(w http.ResponseWriter, r *http.Request) {
		var req struct{ Method, Key, Body string }
		json.NewDecoder(r.Body).Decode(&req)
		out, err := http.NewRequest(req.Method, server+req.Key, strings.NewReader(req.Body))
		if err != nil {
			http.Error(w, err.Error(), 400)
			return
		}
		resp, err := http.DefaultClient.Do(out)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		resp.Body.Close()
		w.WriteHeader(resp.StatusCode)
	})
	report := reports(mux)
	pages := httptest.NewServer(mux)
	defer pages.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	log := startChromium(t, ctx, chromium, pages.URL+"/harness")
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("chromium console:\n%s", consoleLines(log.String()))
		}
	})

	results := pageResults(t, ctx, report)
	want := []string{
		"the first screen shows the children of /", "keys written with curl show, with revision and TTL",
		"a change made elsewhere is highlighted", "a CAS edit that conflicts shows the current value",
		"a delete leaves the list", "a TTL is set", "a new key is created", "the figures come from /metrics",
		"a small room shows its keys, and the crumbs lead back up", "a long prefix is paged",
		"only the prefix on screen is watched", "a write to a shown key updates its row live",
		"a stream back too late starts the view again",
		"another host needs a click before its script runs", "with -tokens it asks for a token, kept for the tab",
	}
	checkResults(t, results, want)
	// What the console did reached the server.
	if r := do(t, "GET", server+"/console/b", ""); r.body != `"mine"` {
		t.Errorf("/console/b after the second save: %s; want \"mine\"", r.body)
	}
	if r := do(t, "GET", server+"/console/a", ""); r.header.Get("X-TTL") == "" {
		t.Errorf("/console/a has no TTL after the console set one")
	}
	for _, req := range unbounded.seen() {
		t.Errorf("the console asked for %s: its answer grows with the store", req)
	}
}

// newWatchedServer is newTestServer, whose main listener also notes
// every request that reads without a bound (see unboundedReads).
func newWatchedServer(t *testing.T, args ...string) (*server, string, *unboundedReads) {
	t.Helper()
	cfg, err := parseConfig(args, func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := newServer(cfg, discardLogger())
	if err != nil {
		t.Fatal(err)
	}
	u := new(unboundedReads)
	hs := httptest.NewServer(u.watch(srv.routes()))
	t.Cleanup(func() {
		hs.Close()
		srv.close()
	})
	return srv, hs.URL, u
}

// unboundedReads notes the requests whose answer grows with what the
// store holds rather than with what was asked: a listing without
// ?limit, and an event stream with ?initial (the state of every key
// under its path first).
type unboundedReads struct {
	mu   sync.Mutex
	reqs []string
}

func (u *unboundedReads) watch(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		accept := r.Header.Get("Accept")
		stream := strings.Contains(accept, "text/event-stream")
		listing := r.Method == "GET" && strings.HasSuffix(r.URL.Path, "/") && !stream && r.Header.Get("Upgrade") == "" &&
			(r.URL.Path != "/" || strings.Contains(accept, "application/json")) // GET / alone is client.js
		if listing && !r.URL.Query().Has("limit") || stream && r.URL.Query().Has("initial") {
			u.mu.Lock()
			u.reqs = append(u.reqs, r.Method+" "+r.URL.String()+" (Accept: "+accept+")")
			u.mu.Unlock()
		}
		next.ServeHTTP(w, r)
	})
}

func (u *unboundedReads) seen() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return slices.Clone(u.reqs)
}

// chromiumFlags are the flags of a headless Chromium run by a test.
func chromiumFlags(t *testing.T) []string {
	return []string{
		"--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--user-data-dir=" + t.TempDir(), "--enable-logging=stderr", "--v=0",
	}
}

// startChromium opens url in headless Chromium, with extra flags, until
// ctx is done or the test ends; what Chromium says is in the log it
// returns (consoleLines picks the page's lines from it).
func startChromium(t *testing.T, ctx context.Context, chromium, url string, extra ...string) *lockedWriter {
	t.Helper()
	log := &lockedWriter{w: new(strings.Builder)}
	cmd := exec.CommandContext(ctx, chromium, append(append(chromiumFlags(t), extra...), url)...)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return log
}

// String returns what was written, for a lockedWriter around a
// strings.Builder (or any writer that is a fmt.Stringer).
func (l *lockedWriter) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.(fmt.Stringer).String()
}

// TestConsoleScreenshot writes docs/console.png, the screenshot README.md
// shows: the console on a prefix of a store with some keys, a few of them
// changing.
// It runs only with ATOMKV_SCREENSHOT=1:
//
//	ATOMKV_SCREENSHOT=1 go test -run TestConsoleScreenshot .
func TestConsoleScreenshot(t *testing.T) {
	if os.Getenv("ATOMKV_SCREENSHOT") == "" {
		t.Skip("writes docs/console.png; run with ATOMKV_SCREENSHOT=1")
	}
	chromium := needTool(t, "chromium", "chromium")
	srv, server := newTestServer(t)
	for key, value := range map[string]string{
		"/config/theme": `"dark"`, "/config/max-players": `8`,
		"/room/42/topic": `"Friday planning"`, "/room/42/cursor/ann": `{"x":120,"y":48}`,
		"/room/42/cursor/bob": `{"x":310,"y":200}`, "/room/7/topic": `"retro"`,
		"/room/42/members": `["ann","bob"]`, "/room/42/created": `"2026-03-02T09:00:00Z"`, "/room/42/max": `8`,
		"/user:42": `{"name":"Ann","langs":["go","js"]}`, "/user:43": `{"name":"Bob"}`,
	} {
		do(t, "POST", server+key, value)
	}
	do(t, "POST", server+"/session/ann", `{"since":"09:14"}`, "X-TTL", "25m")
	do(t, "POST", server+"/room/42/typing/bob", `true`, "X-TTL", "30s")
	admin := httptest.NewServer(srv.adminRoutes())
	defer admin.Close()

	// Changes while the page runs, so that the figures and the highlight
	// have something to show.
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			// Over HTTP, so that the metrics count them.
			post := func(key, value string) {
				if resp, err := http.Post(server+key, "application/json", strings.NewReader(value)); err == nil {
					resp.Body.Close()
				}
			}
			post("/room/42/cursor/bob", fmt.Sprintf(`{"x":%d,"y":%d}`, 310+i, 200-i%30))
			if i%5 == 0 {
				post("/room/42/topic", fmt.Sprintf(`"Friday planning (%d)"`, i/5))
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// Ready once the children of /room/42/ show, a change is highlighted
	// and the sparklines have a few points; then the editor is opened on
	// a key.
	png := screenshot(t, ctx, chromium, admin.URL+"/?server="+server+"&path=/room/42/",
		`document.querySelectorAll('.row').length >= 6 && document.querySelector('.row.changed') !== null &&
		 document.querySelector('#figure-writes polyline').getAttribute('points').split(' ').length >= 6`,
		`document.querySelector('.row[data-key="/room/42/topic"]').click()`)
	out, _ := filepath.Abs("docs/console.png")
	if err := os.WriteFile(out, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %s", out)
}

// screenshot opens url in headless Chromium, waits until the page's
// expression ready is true, evaluates then, and returns a PNG of the page. It speaks the
// DevTools protocol over its WebSocket: --screenshot alone takes the
// picture at the load event, before the console has its keys.
func screenshot(t *testing.T, ctx context.Context, chromium, url, ready, then string) []byte {
	t.Helper()
	cmd := exec.CommandContext(ctx, chromium, append(chromiumFlags(t), "--hide-scrollbars", "--window-size=1280,900",
		"--remote-debugging-port=0", url)...)
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	var browser string // ws://127.0.0.1:port/devtools/browser/…
	sc := bufio.NewScanner(stderr)
	for sc.Scan() {
		if _, u, ok := strings.Cut(sc.Text(), "DevTools listening on "); ok {
			browser = u
			break
		}
	}
	go io.Copy(io.Discard, stderr)
	if browser == "" {
		t.Fatal("chromium printed no DevTools address")
	}
	// The page's own target.
	host := strings.Split(strings.TrimPrefix(browser, "ws://"), "/")[0]
	var target string
	waitFor(t, "the page's DevTools target", func() bool {
		resp, err := http.Get("http://" + host + "/json/list")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		var targets []struct{ Type, URL, WebSocketDebuggerURL string }
		json.NewDecoder(resp.Body).Decode(&targets)
		for _, tg := range targets {
			if tg.Type == "page" && tg.URL == url {
				target = tg.WebSocketDebuggerURL
			}
		}
		return target != ""
	})
	ws, err := websocket.Dial(target, "", "http://"+host)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	id := 0
	call := func(method string, params any) json.RawMessage {
		id++
		websocket.JSON.Send(ws, map[string]any{"id": id, "method": method, "params": params})
		for {
			var msg struct {
				ID     int
				Result json.RawMessage
				Error  json.RawMessage
			}
			if err := websocket.JSON.Receive(ws, &msg); err != nil {
				t.Fatalf("%s: %v", method, err)
			}
			if msg.ID == id {
				if msg.Error != nil {
					t.Fatalf("%s: %s", method, msg.Error)
				}
				return msg.Result
			}
		}
	}
	waitFor(t, "the page to be ready ("+ready+")", func() bool {
		var r struct{ Result struct{ Value bool } }
		json.Unmarshal(call("Runtime.evaluate", map[string]any{"expression": ready, "returnByValue": true}), &r)
		return r.Result.Value
	})
	call("Runtime.evaluate", map[string]any{"expression": then})
	var shot struct{ Data []byte }
	json.Unmarshal(call("Page.captureScreenshot", map[string]any{"format": "png"}), &shot)
	// Close the browser, whose helper processes would otherwise go on
	// writing to its profile while the test removes it: killing the
	// browser's own process leaves them running.
	websocket.JSON.Send(ws, map[string]any{"id": id + 1, "method": "Browser.close"})
	cmd.Wait()
	return shot.Data
}

// TestConsoleCluster drives the console of a node on a three-member etcd
// in headless Chromium (testdata/consolecluster.html): it shows the
// node's etcd (its prefix; each member, the one requests go to and the
// one the watch is on; healthy; the view's revision against etcd's, the
// lag; reconnects, resyncs; the last error) and its figures; a write
// moves the revision; the member under the watch killed, the watch moves
// and the member's failures and the error show; without a quorum the
// node shows out of reach, then healthy once etcd is back. A server
// alone shows nothing of etcd.
func TestConsoleCluster(t *testing.T) {
	t.Parallel()
	chromium := needTool(t, "chromium", "chromium")
	c := startEtcd(t, 3)
	// The node prefers a follower, whose loss costs no election.
	leader := c.leader()
	order := []int{(leader + 1) % 3, (leader + 2) % 3, leader}
	var endpoints []string
	for _, i := range order {
		endpoints = append(endpoints, c.endpoints()[i])
	}
	n := startNode(t, endpoints, newPrefix(), "-write-timeout", "2s")
	single, singleURL := newTestServer(t)

	harness, err := os.ReadFile("testdata/consolecluster.html")
	if err != nil {
		t.Fatal(err)
	}
	eps, _ := json.Marshal(endpoints)
	harness = bytes.ReplaceAll(harness, []byte("{{SERVER}}"), []byte(n.url))
	harness = bytes.ReplaceAll(harness, []byte("{{SINGLE}}"), []byte(singleURL))
	harness = bytes.ReplaceAll(harness, []byte("{{ENDPOINTS}}"), eps)
	mux := http.NewServeMux()
	mux.Handle("/", n.srv.adminRoutes())
	mux.Handle("/single/", http.StripPrefix("/single", single.adminRoutes()))
	mux.HandleFunc("GET /harness", func(w http.ResponseWriter, r *http.Request) { w.Write(harness) })
	mux.HandleFunc("POST /write", func(w http.ResponseWriter, r *http.Request) {
		key, _ := io.ReadAll(r.Body)
		resp, err := http.Post(n.url+string(key), "application/json", strings.NewReader("1"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		resp.Body.Close()
		w.WriteHeader(resp.StatusCode)
	})
	mux.HandleFunc("POST /kill", func(w http.ResponseWriter, r *http.Request) {
		i, err := strconv.Atoi(r.URL.Query().Get("member"))
		if err != nil || i < 0 || i >= len(order) {
			http.Error(w, "member: want 0, 1 or 2", 400)
			return
		}
		c.kill(order[i])
	})
	mux.HandleFunc("POST /start", func(w http.ResponseWriter, r *http.Request) { c.start(order...) })
	report := reports(mux)
	pages := httptest.NewServer(mux)
	defer pages.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	log := startChromium(t, ctx, chromium, pages.URL+"/harness")
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("chromium console:\n%s", consoleLines(log.String()))
		}
	})
	checkResults(t, pageResults(t, ctx, report), []string{
		"a node shows its etcd", "a write moves the revision",
		"a member killed: the watch moves, and its failures and the last error show",
		"no quorum: out of reach, then healthy again", "a server alone shows no etcd",
	})
}
