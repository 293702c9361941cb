package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// writeTokens writes a -tokens file and returns its name.
func writeTokens(t *testing.T, lines ...string) string {
	t.Helper()
	name := filepath.Join(t.TempDir(), "tokens")
	if err := os.WriteFile(name, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return name
}

// The callers of the access matrix, and their tokens.
var matrixTokens = []string{
	"# who may do what",
	"",
	"reader-token   read  /room/",
	"writer-token   write /room/",
	"elsewhere-token write /elsewhere/ /one-key",
}

var matrixCallers = []struct{ name, token string }{
	{"no token", ""},
	{"read token", "reader-token"},
	{"write token", "writer-token"},
	{"out-of-scope token", "elsewhere-token"},
	{"unknown token", "no-such-token"},
}

// matrixWant is the SPEC 9 answer for a caller doing a read or a write in
// scope (/room/) or out of it: 0 if allowed, else 401 or 403.
func matrixWant(caller string, write, inScope bool) int {
	switch caller {
	case "no token", "unknown token":
		return http.StatusUnauthorized
	case "read token":
		if !write && inScope {
			return 0
		}
	case "write token":
		if inScope {
			return 0
		}
	}
	return http.StatusForbidden
}

// TestAccessMatrix: every caller × every HTTP operation, SSE, KvServer
// REST and WebSocket message, on a path in the tokens' scope (/room/) and
// one out of it (/else/), each with the SPEC answer.
func TestAccessMatrix(t *testing.T) {
	srv, url := newTestServer(t, "-tokens", writeTokens(t, matrixTokens...), "-kvserver-rest", "/storage")
	for _, k := range []string{"/room/a", "/else/a"} {
		srv.store.Set(k, "1", 0)
	}
	type op struct {
		name, method, path, body string
		write                    bool
		headers                  []string
	}
	ops := func(dir string) []op {
		key := dir + "a"
		return []op{
			{"GET", "GET", key, "", false, nil},
			{"listing", "GET", dir, "", false, nil},
			{"SSE", "GET", dir, "", false, []string{"Accept", "text/event-stream"}},
			{"POST", "POST", key, "2", true, nil},
			{"PUT", "PUT", key, "3", true, []string{"X-Revision", "999"}},
			{"DELETE", "DELETE", key, "", true, []string{"X-Revision", "999"}},
			{"REST GET", "GET", "/storage" + key, "", false, nil},
			{"REST POST", "POST", "/storage" + key, `{"value":4}`, true, nil},
			{"REST DELETE", "DELETE", "/storage" + dir + "gone", "", true, nil},
		}
	}
	for _, c := range matrixCallers {
		for _, via := range []string{"header", "query"} {
			for _, inScope := range []bool{true, false} {
				dir := "/else/"
				if inScope {
					dir = "/room/"
				}
				for _, o := range ops(dir) {
					target, headers := url+o.path, o.headers
					if c.token != "" && via == "header" {
						headers = append([]string{"Authorization", "Bearer " + c.token}, headers...)
					} else if c.token != "" {
						target += "?token=" + c.token
					}
					got := doAccess(t, o.method, target, o.body, headers...)
					want := matrixWant(c.name, o.write, inScope)
					switch {
					case want == 0 && (got.code == 401 || got.code == 403 || got.code >= 500):
						t.Errorf("%s (%s) %s %s: %d %s; want it allowed", c.name, via, o.name, o.path, got.code, got.body)
					case want != 0 && got.code != want:
						t.Errorf("%s (%s) %s %s: %d %s; want %d", c.name, via, o.name, o.path, got.code, got.body, want)
					case want != 0 && !strings.Contains(errorMessage(got), "token") || want != 0 && got.header.Get("Access-Control-Allow-Origin") != "*":
						t.Errorf("%s %s %s: %q, headers %v; want a JSON error about the token, with CORS headers", c.name, o.name, o.path, got.body, got.header)
					}
				}
			}
		}
	}

	// The WebSocket: an unknown token, or none, cannot connect; the
	// others can, and each message is checked on its own, in both
	// spellings of keys.
	for _, c := range matrixCallers {
		ws, code := dialToken(t, url, c.token)
		if c.name == "no token" || c.name == "unknown token" {
			if code != http.StatusUnauthorized {
				t.Errorf("%s: WebSocket upgrade answered %d; want 401", c.name, code)
			}
			continue
		}
		if ws == nil {
			t.Fatalf("%s: WebSocket upgrade answered %d; want 101", c.name, code)
		}
		for _, inScope := range []bool{true, false} {
			for _, slash := range []string{"/", ""} {
				dir := slash + "else/"
				if inScope {
					dir = slash + "room/"
				}
				key := dir + "a"
				for _, m := range []struct {
					msg, allowed string
					write        bool
				}{
					{`{"type":"get","payload":{"key":"` + key + `"},"id":1}`, "value", false},
					{`{"type":"list","payload":{"prefix":"` + dir + `"},"id":1}`, "values", false},
					{`{"type":"subscribe","payload":{"key":"` + dir + `"},"id":1}`, "ok", false},
					{`{"type":"unsubscribe","payload":{"key":"` + dir + `"},"id":1}`, "ok", false}, // needs nothing
					{`{"type":"set","payload":{"key":"` + key + `","value":5},"id":1}`, "ok", true},
					{`{"type":"update","payload":{"key":"` + key + `","value":6,"revision":999},"id":1}`, "conflict", true},
					{`{"type":"delete","payload":{"key":"` + key + `","revision":999},"id":1}`, "conflict", true},
				} {
					ws.send(m.msg)
					got := ws.recv()
					want := `{"type":"` + m.allowed + `"`
					if matrixWant(c.name, m.write, inScope) != 0 && !strings.Contains(m.msg, "unsubscribe") {
						op := "read"
						if m.write {
							op = "write"
						}
						want = `{"type":"error","payload":"this token may not ` + op + ` \"/` + strings.TrimPrefix(dir, "/")
					}
					if !strings.HasPrefix(got, want) {
						t.Errorf("%s: sent %s\n got %s\nwant %s…", c.name, m.msg, got, want)
					}
				}
			}
		}
	}
	// Nothing the refused writes tried is there; the allowed ones are.
	if e := srv.store.Get("/else/a"); e == nil || e.value != "1" {
		t.Errorf("/else/a after the matrix: %v; want untouched", e)
	}
}

// doAccess sends one request like do, and for an event stream closes it
// once the answer's head has come.
func doAccess(t *testing.T, method, url, body string, headers ...string) response {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, method, url, strings.NewReader(body))
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	if resp.Header.Get("Content-Type") == "text/event-stream" {
		return response{resp.StatusCode, resp.Header, ""}
	}
	b, _ := io.ReadAll(resp.Body)
	return response{resp.StatusCode, resp.Header, string(b)}
}

// dialToken opens a WebSocket with ?token= (none if token is ""), or
// returns the status that refused it.
func dialToken(t *testing.T, url, token string) (*wsClient, int) {
	t.Helper()
	path := "/"
	if token != "" {
		path += "?token=" + token
	}
	req, _ := http.NewRequest("GET", url+path, nil)
	for _, h := range [][2]string{{"Connection", "Upgrade"}, {"Upgrade", "websocket"},
		{"Sec-WebSocket-Version", "13"}, {"Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="}} {
		req.Header.Set(h[0], h[1])
	}
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close() // a 101's body is the connection: closed unread
	if resp.StatusCode != http.StatusSwitchingProtocols {
		return nil, resp.StatusCode
	}
	cfg, _ := websocket.NewConfig(strings.Replace(url, "http://", "ws://", 1)+path, "http://localhost/")
	ws, err := websocket.DialConfig(cfg)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { ws.Close() })
	return &wsClient{t, ws}, resp.StatusCode
}

// TestAccessPublic: what a request without a token may do under each
// -public, and that without -tokens everything is open, as before.
func TestAccessPublic(t *testing.T) {
	tokens := writeTokens(t, "writer-token write /room/")
	bearer := []string{"Authorization", "Bearer writer-token"}
	t.Run("read", func(t *testing.T) {
		_, url := newTestServer(t, "-tokens", tokens, "-public", "read")
		for _, step := range []struct {
			method, path string
			headers      []string
			want         int
		}{
			{"POST", "/room/a", nil, 401},
			{"POST", "/room/a", bearer, 200},
			{"POST", "/else/a", bearer, 403},
			{"GET", "/room/a", nil, 200},
			{"GET", "/room/", nil, 200},
			{"GET", "/else/a", bearer, 404}, // public read, with a token too: a missing key
			{"DELETE", "/room/a", nil, 401},
		} {
			if got := do(t, step.method, url+step.path, "1", step.headers...); got.code != step.want {
				t.Errorf("-public read: %s %s %v: %d %s; want %d", step.method, step.path, step.headers, got.code, got.body, step.want)
			}
		}
		if got := errorMessage(do(t, "POST", url+"/room/a", "1")); got != `missing token: writing "/room/a" needs one (Authorization: Bearer …, or ?token=…)` {
			t.Errorf("the 401 message: %q", got)
		}
		ch, _ := openStream(t, url, "/room/")
		do(t, "POST", url+"/room/b", "7", bearer...)
		if ev := nextEvent(t, ch); ev.data != "7" {
			t.Errorf("a public stream got %v; want the change", ev)
		}
		ws, code := dialToken(t, url, "")
		if ws == nil {
			t.Fatalf("a WebSocket without a token under -public read: %d; want 101", code)
		}
		ws.roundTrip(`{"type":"get","payload":{"key":"room/b"}}`, `{"type":"value","payload":{"key":"room/b","value":7,"revision":0}}`)
		ws.roundTrip(`{"type":"set","payload":{"key":"room/b","value":8}}`,
			`{"type":"error","payload":"missing token: writing \"/room/b\" needs one (Authorization: Bearer …, or ?token=…)"}`)
	})
	t.Run("write", func(t *testing.T) {
		_, url := newTestServer(t, "-tokens", tokens, "-public", "write")
		if got := do(t, "POST", url+"/else/a", "1"); got.code != 200 {
			t.Errorf("-public write: POST without a token: %d %s", got.code, got.body)
		}
		if got := do(t, "POST", url+"/else/a", "1", "Authorization", "Bearer wrong"); got.code != 401 {
			t.Errorf("-public write: an unknown token: %d; want 401", got.code)
		}
	})
	t.Run("none", func(t *testing.T) {
		_, url := newTestServer(t, "-tokens", tokens, "-public", "none")
		for _, path := range []string{"/room/a", "/room/"} {
			if got := do(t, "GET", url+path, ""); got.code != 401 {
				t.Errorf("-public none: GET %s without a token: %d; want 401", path, got.code)
			}
		}
		if got := do(t, "GET", url+"/", ""); got.code != 200 || !strings.Contains(got.body, "AtomKV") {
			t.Errorf("-public none: the client script: %d; want it served to all", got.code)
		}
		if got := do(t, "OPTIONS", url+"/room/a", "", "Origin", "http://x", "Access-Control-Request-Headers", "authorization"); got.code != 204 ||
			!strings.Contains(got.header.Get("Access-Control-Allow-Headers"), "Authorization") {
			t.Errorf("-public none: a preflight: %d %v; want 204 allowing Authorization", got.code, got.header)
		}
	})
	t.Run("no tokens", func(t *testing.T) {
		_, url := newTestServer(t)
		if got := do(t, "POST", url+"/x", "1", "Authorization", "Bearer anything"); got.code != 200 {
			t.Errorf("without -tokens: %d; want everything open", got.code)
		}
		if _, err := parseConfig([]string{"-public", "read"}, func(string) string { return "" }, io.Discard); err == nil ||
			!strings.Contains(err.Error(), "-public needs -tokens") {
			t.Errorf("-public without -tokens: %v; want an error", err)
		}
	})
}

// TestTokensFile: a bad -tokens file stops the start with its name and
// line, and never quotes a token.
func TestTokensFile(t *testing.T) {
	for _, tc := range []struct{ line, want string }{
		{"secret-1", ":3: want <token> <read|write> <path>..."},
		{"secret-1 read", ":3: want <token> <read|write> <path>..."},
		{"secret-1 admin /", `:3: permission "admin": want read or write`},
		{"secret-1 read room/", `:3: invalid path "room/": must begin with "/"`},
		{"secret-1 read /a//b", `:3: invalid key "/a//b": empty component`},
	} {
		name := writeTokens(t, "# tokens", "ok-token read /", tc.line)
		_, err := newServer(config{tokens: name, maxKeyBytes: 4096}, discardLogger())
		if err == nil || !strings.HasPrefix(err.Error(), name+tc.want) || strings.Contains(err.Error(), "secret") {
			t.Errorf("line %q: %v; want %s%s…", tc.line, err, name, tc.want)
		}
	}
	err := run(context.Background(), []string{"-tokens", "/nonexistent/tokens"}, func(string) string { return "" }, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/tokens") {
		t.Errorf("a missing file: %v", err)
	}
}

// TestTokensNotLogged: with -log-requests, neither a ?token= nor an
// Authorization header reaches the log.
func TestTokensNotLogged(t *testing.T) {
	cfg, _ := parseConfig([]string{"-log-requests", "-tokens", writeTokens(t, "s3cret-token read /")}, func(string) string { return "" }, io.Discard)
	var log strings.Builder
	srv, err := newServer(cfg, slog.New(slog.NewTextHandler(&log, nil)))
	if err != nil {
		t.Fatal(err)
	}
	h := srv.routes()
	for _, target := range []string{"/a?token=s3cret-token", "/a?initial&token=s3cret-token&x=1", "/a?token=s3cret-wrong"} {
		h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", target, nil))
	}
	req := httptest.NewRequest("GET", "/a", nil)
	req.Header.Set("Authorization", "Bearer s3cret-token")
	h.ServeHTTP(httptest.NewRecorder(), req)
	if strings.Contains(log.String(), "s3cret") || !strings.Contains(log.String(), `query="token=…"`) ||
		!strings.Contains(log.String(), `query="initial&token=…&x=1"`) {
		t.Errorf("log:\n%s\nwant every token elided as token=…", log.String())
	}
}

// TestTokensReload runs the real server in a child process and sends it
// SIGHUP: a token added works, one removed is refused and its stream
// closed, one whose grants changed has its stream closed, the others'
// streams and WebSocket go on; a bad file keeps the old tokens.
func TestTokensReload(t *testing.T) {
	file := writeTokens(t, "keep write /k/", "gone write /k/", "changed write /k/")
	c := startChild(t, "main", "ATOMKV_TOKENS="+file)
	t.Cleanup(func() { c.cmd.Process.Signal(syscall.SIGTERM) }) // main does not watch stdin
	logged := make(chan string, 100)
	go func() {
		for c.lines.Scan() {
			select {
			case logged <- c.lines.Text():
			default:
			}
		}
	}()
	url := "http://" + c.addr
	bearer := func(tok string) []string { return []string{"Authorization", "Bearer " + tok} }
	waitLog := func(what string) string {
		t.Helper()
		timeout := time.After(10 * time.Second)
		for {
			select {
			case line := <-logged:
				if strings.Contains(line, what) {
					return line
				}
			case <-timeout:
				t.Fatalf("no %q in the log", what)
			}
		}
	}

	keep, _ := openStream(t, url, "/k/", bearer("keep")...)
	gone, _ := openStream(t, url, "/k/", bearer("gone")...)
	changed, _ := openStream(t, url, "/k/", bearer("changed")...)
	ws, _ := dialToken(t, url, "keep")
	ws.roundTrip(`{"type":"subscribe","payload":{"key":"/k/"},"id":1}`, `{"type":"ok","payload":{"key":"/k/"},"id":1}`)

	os.WriteFile(file, []byte("keep write /k/\nchanged read /k/\nnew write /k/\n"), 0o600)
	c.cmd.Process.Signal(syscall.SIGHUP)
	if line := waitLog("tokens reloaded"); !strings.Contains(line, "tokens=3 streams_closed=2") {
		t.Errorf("reload logged %q; want 3 tokens, 2 streams closed", line)
	}
	for name, ch := range map[string]<-chan sseEvent{"removed": gone, "changed": changed} {
		select {
		case ev, open := <-ch:
			if open {
				t.Errorf("the stream of the %s token got %v; want it closed", name, ev)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("the stream of the %s token is still open", name)
		}
	}
	if got := do(t, "POST", url+"/k/a", "1", bearer("new")...); got.code != 200 {
		t.Errorf("the added token: %d %s", got.code, got.body)
	}
	if got := do(t, "POST", url+"/k/a", "1", bearer("gone")...); got.code != 401 {
		t.Errorf("the removed token: %d; want 401", got.code)
	}
	if got := do(t, "POST", url+"/k/a", "1", bearer("changed")...); got.code != 403 {
		t.Errorf("the token now read-only: %d; want 403", got.code)
	}
	if ev := nextEvent(t, keep); ev.data != "1" {
		t.Errorf("the kept token's stream got %v; want the change", ev)
	}
	if got := ws.recv(); !strings.HasPrefix(got, `{"type":"value","payload":{"key":"/k/a","value":1`) {
		t.Errorf("the kept token's WebSocket got %s; want the change", got)
	}

	os.WriteFile(file, []byte("keep write /k/\nnew writer /k/\n"), 0o600)
	c.cmd.Process.Signal(syscall.SIGHUP)
	if line := waitLog("tokens not reloaded"); !strings.Contains(line, file+`:2: permission \"writer\"`) {
		t.Errorf("a bad file logged %q; want its name and line", line)
	}
	if got := do(t, "POST", url+"/k/a", "2", bearer("new")...); got.code != 200 {
		t.Errorf("after a bad file, the tokens in force: %d %s", got.code, got.body)
	}
	if ev := nextEvent(t, keep); ev.data != "2" {
		t.Errorf("after a bad file, the kept stream got %v", ev)
	}
}

// TestOriginsMatrix: with -origins, every method and interface, from a
// listed origin, an unlisted one, "null", a look-alike and none. A
// request from an origin not listed is refused with 403 and a JSON error,
// without CORS headers, and changes nothing; the others are served, a
// listed origin with its Access-Control-Allow-Origin.
func TestOriginsMatrix(t *testing.T) {
	srv, url := newTestServer(t, "-origins", "http://good.example, HTTPS://Also.Example:8443/", "-kvserver-rest", "/storage")
	srv.store.Set("/k", `"v"`, 0)
	type request struct {
		name, method, path, body string
		headers                  []string
	}
	requests := []request{
		{"GET", "GET", "/k", "", nil},
		{"listing", "GET", "/", "", []string{"Accept", "application/json"}},
		{"client", "GET", "/", "", nil},
		{"SSE", "GET", "/k", "", []string{"Accept", "text/event-stream"}},
		{"POST", "POST", "/k", `"w"`, []string{"Content-Type", "application/json"}},
		{"simple POST", "POST", "/k", `"x"`, []string{"Content-Type", "text/plain"}},
		{"PUT", "PUT", "/k", `"y"`, []string{"X-Revision", "99"}},
		{"DELETE", "DELETE", "/k", "", []string{"X-Revision", "99"}},
		{"preflight", "OPTIONS", "/k", "", []string{"Access-Control-Request-Method", "PUT"}},
		{"REST GET", "GET", "/storage/k", "", nil},
		{"REST POST", "POST", "/storage/k", `{"value":"z"}`, nil},
		{"REST DELETE", "DELETE", "/storage/gone", "", nil},
		{"PATCH", "PATCH", "/k", "", nil},
	}
	for _, tt := range []struct {
		origin string // "" for none
		listed bool
		allow  string // Access-Control-Allow-Origin answered
	}{
		{"http://good.example", true, "http://good.example"},
		{"https://also.example:8443", true, "https://also.example:8443"},
		{"", true, ""},
		{"http://evil.example", false, ""},
		{"null", false, ""},
		{"http://good.example.evil.example", false, ""},
		{"http://good.example:80", false, ""},
		{"https://good.example", false, ""},
	} {
		for _, rq := range requests {
			what := fmt.Sprintf("%s from %q", rq.name, tt.origin)
			headers := rq.headers
			if tt.origin != "" {
				headers = append([]string{"Origin", tt.origin}, headers...)
			}
			before := state(srv.store)
			got := doAccess(t, rq.method, url+rq.path, rq.body, headers...)
			if got.header.Get("Access-Control-Allow-Origin") != tt.allow {
				t.Errorf("%s: Access-Control-Allow-Origin %q; want %q", what, got.header.Get("Access-Control-Allow-Origin"), tt.allow)
			}
			if got.header.Get("Vary") != "Origin" {
				t.Errorf("%s: Vary %q; want Origin", what, got.header.Get("Vary"))
			}
			if tt.listed {
				if got.code == 403 || got.code >= 500 {
					t.Errorf("%s: %d %s; want it served", what, got.code, got.body)
				}
				continue
			}
			if got.code != 403 || !strings.Contains(errorMessage(got), "origin") || got.header.Get("Access-Control-Allow-Methods") != "" {
				t.Errorf("%s: %d %s %v; want 403, a JSON error about the origin, no CORS headers", what, got.code, got.body, got.header)
			}
			if after := state(srv.store); !mapsEqual(before, after) {
				t.Errorf("%s: the store went from %v to %v", what, before, after)
			}
		}
		// The WebSocket upgrade, with and without Origin.
		header := ""
		if tt.origin != "" {
			header = "Origin: " + tt.origin + "\r\n"
		}
		conn, err := net.Dial("tcp", strings.TrimPrefix(url, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
			"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s\r\n", header)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		conn.Close()
		want := http.StatusSwitchingProtocols
		if !tt.listed {
			want = http.StatusForbidden
		}
		if err != nil || resp.StatusCode != want || !tt.listed && resp.Header.Get("Content-Type") != "application/json" {
			t.Errorf("WebSocket from %q: %v %v; want %d", tt.origin, resp, err, want)
		}
	}
	// The listed origins did write.
	if e := srv.store.Get("/k"); e == nil || e.revision == 0 {
		t.Errorf("/k after the listed origins: %v; want written", e)
	}

	// "null" is an origin like any other: allowed if listed.
	_, url = newTestServer(t, "-origins", "null")
	if got := do(t, "POST", url+"/n", "1", "Origin", "null"); got.code != 200 || got.header.Get("Access-Control-Allow-Origin") != "null" {
		t.Errorf("-origins null, from null: %d %v; want 200", got.code, got.header)
	}
	for _, bad := range []string{"good.example", "http://good.example/app", "http://good.example?x", "*, http://a.example", "http://"} {
		cfg, err := parseConfig([]string{"-origins", bad}, func(string) string { return "" }, io.Discard)
		if err == nil {
			_, err = newServer(cfg, discardLogger())
		}
		if err == nil || !strings.Contains(err.Error(), "-origins") {
			t.Errorf("-origins %q: %v; want an error naming -origins", bad, err)
		}
	}
}

// FuzzParseTokens: whatever a -tokens file holds, reading it never panics;
// an error names the file and a line of it (or the file alone, for a
// line too long to read) and does not quote the line's token; and a file
// that reads gives every token the grants of its lines, one per path,
// which the file written again from its lines (single spaces, no
// comments) gives too.
func FuzzParseTokens(f *testing.F) {
	for _, seed := range []string{
		"", "# only a comment\n", "tok read /\n", "tok write /a /b/ /c\r\n\nother read /x",
		"a read /\na write /b\n", "   \t\n  # indented comment\n tok  read   /k ",
		"tok", "tok read", "tok admin /", "tok read room/", "tok read /a//b", "tok read /a\x00",
		"tok read /ключ/", "tok read " + strings.Repeat("/x", 3000), "#tok read /\ntok2 read /",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, file string) {
		const name = "tokens.txt"
		table, err := parseTokens(name, strings.NewReader(file), 4096)
		lines := strings.Split(file, "\n")
		if err != nil {
			msg := err.Error()
			rest, ok := strings.CutPrefix(msg, name+":")
			if !ok {
				t.Fatalf("error %q does not name the file", msg)
			}
			num, _, numbered := strings.Cut(rest, ": ")
			n, convErr := strconv.Atoi(num)
			if !numbered || convErr != nil {
				if !strings.HasPrefix(rest, " bufio.Scanner") {
					t.Fatalf("error %q names no line", msg)
				}
				return
			}
			if n < 1 || n > len(lines) {
				t.Fatalf("error %q names line %d of %d", msg, n, len(lines))
			}
			fields := strings.Fields(lines[n-1])
			if len(fields) == 0 || strings.HasPrefix(fields[0], "#") {
				t.Fatalf("error %q names a blank or comment line %q", msg, lines[n-1])
			}
			// A token long enough to be told apart from the words of the
			// message, and from the rest of its line, which it may quote.
			if tok := fields[0]; len(tok) >= 12 && !strings.Contains(strings.Join(fields[1:], " "), tok) && strings.Contains(msg, tok) {
				t.Fatalf("error %q quotes the token %q", msg, tok)
			}
			return
		}
		want := tokenTable{}
		var again strings.Builder
		for _, line := range lines {
			fields := strings.Fields(line)
			if len(fields) == 0 || strings.HasPrefix(fields[0], "#") {
				continue
			}
			if len(fields) < 3 {
				t.Fatalf("line %q read without a path", line)
			}
			p := map[string]perm{"read": permRead, "write": permWrite}[fields[1]]
			d := tokenDigest(sha256.Sum256([]byte(fields[0])))
			for _, path := range fields[2:] {
				if checkPath(path, 4096) != nil {
					t.Fatalf("line %q read with the bad path %q", line, path)
				}
				want[d] = append(want[d], grant{p, path})
			}
			again.WriteString(strings.Join(fields, " ") + "\n")
		}
		if !reflect.DeepEqual(table, want) {
			t.Fatalf("read %d tokens %v; want %v", len(table), table, want)
		}
		if table2, err := parseTokens(name, strings.NewReader(again.String()), 4096); err != nil || !reflect.DeepEqual(table2, table) {
			t.Fatalf("written again as %q: %v, %v; want the same table", again.String(), table2, err)
		}
	})
}

// FuzzOrigins: whatever the -origins flag holds, reading it never panics;
// "*" alone is any origin (nil); an error names -origins; and a list that
// reads holds each entry as a browser sends it in Origin ("null", or a
// lower-case scheme://host[:port]), which read again is itself: the list
// of what was read reads as the same list.
func FuzzOrigins(f *testing.F) {
	for _, seed := range []string{
		"*", " * ", "", ",", "null", "https://app.example", "HTTPS://Also.Example:8443/",
		"https://a.example, http://b.example:8080", "good.example", "http://good.example/app",
		"http://good.example?x", "*, http://a.example", "http://", "http://u:p@h.example", "http://h.example#f",
		"http://[::1]:80", "http://%41.example",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, list string) {
		origins, err := parseOrigins(list)
		switch {
		case err != nil:
			if !strings.HasPrefix(err.Error(), "-origins: ") {
				t.Fatalf("error %q does not name -origins", err)
			}
			return
		case origins == nil:
			if strings.TrimSpace(list) != "*" {
				t.Fatalf("%q reads as any origin", list)
			}
			return
		}
		entries := 0
		for o := range strings.SplitSeq(list, ",") {
			if strings.TrimSpace(o) != "" {
				entries++
			}
		}
		if len(origins) > entries {
			t.Fatalf("%q: %d origins from %d entries", list, len(origins), entries)
		}
		var read []string
		for o := range origins {
			if o != "null" && (o != strings.ToLower(o) || strings.ContainsAny(o, ", \t\r\n") || !strings.Contains(o, "://") || strings.Contains(o[strings.Index(o, "://")+3:], "/")) {
				t.Fatalf("%q: origin %q is not as a browser sends it", list, o)
			}
			if again, err := parseOrigins(o); err != nil || len(again) != 1 || !again[o] {
				t.Fatalf("%q: origin %q read again: %v, %v", list, o, again, err)
			}
			read = append(read, o)
		}
		if again, err := parseOrigins(strings.Join(read, ",")); err != nil || !reflect.DeepEqual(again, origins) {
			t.Fatalf("%q: read as %v, which read again is %v, %v", list, origins, again, err)
		}
	})
}
