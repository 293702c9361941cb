package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"
)

// The tokens of the one-key test: each may touch one part of the store.
var oneKeyTokens = map[string][]grant{
	"room-read":  {{permRead, "/room/"}},
	"room-write": {{permWrite, "/room/"}},
	"native":     {{permWrite, "/storage/"}}, // the store's keys /storage/…, not KvServer's
	"":           nil,                        // no token: -public none
}

// TestAllowFromRoutes: on every path of each shape, the Allow that a 405
// and a preflight answer lists exactly the methods that are not 405
// there, and the preflight's Access-Control-Allow-Methods the same but
// HEAD: methodsOf reads them from the route table, so a route added or
// taken away changes them. A method the native API has and KvServer's
// shape does not (PATCH under /storage) answers with KvServer's.
func TestAllowFromRoutes(t *testing.T) {
	methods := []string{"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "PROPFIND"}
	for _, tt := range []struct {
		flags []string
		paths []string
	}{
		{nil, []string{"/", "/x", "/x/", "/storage/x"}},
		{[]string{"-kvserver-rest", "/storage"}, []string{"/", "/x", "/storage", "/storage/", "/storage/x", "/storage/x/y", "/storagex"}},
	} {
		cfg, err := parseConfig(tt.flags, func(string) string { return "" }, io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		srv, _ := newServer(cfg, discardLogger())
		h := srv.routes()
		for _, path := range tt.paths {
			t.Run(fmt.Sprintf("%v %s", tt.flags, path), func(t *testing.T) {
				var has []string
				answers := map[string]http.Header{}
				for _, m := range methods {
					rec := httptest.NewRecorder()
					h.ServeHTTP(rec, httptest.NewRequest(m, path, nil))
					answers[m] = rec.Header()
					if rec.Code != http.StatusMethodNotAllowed {
						has = append(has, m)
					}
				}
				sorted := func(list string) []string {
					ms := strings.Split(list, ", ")
					slices.Sort(ms)
					return ms
				}
				slices.Sort(has)
				noHead := slices.DeleteFunc(slices.Clone(has), func(m string) bool { return m == "HEAD" })
				for _, m := range []string{"OPTIONS", "PUT", "PATCH", "TRACE"} {
					if got := sorted(answers[m].Get("Allow")); (m == "OPTIONS" || !slices.Contains(has, m)) && !slices.Equal(got, has) {
						t.Errorf("%s %s: Allow %q; want the methods that are not 405 there, %q", m, path, got, has)
					}
				}
				if got := sorted(answers["OPTIONS"].Get("Access-Control-Allow-Methods")); !slices.Equal(got, noHead) {
					t.Errorf("OPTIONS %s: Access-Control-Allow-Methods %q; want %q", path, got, noHead)
				}
			})
		}
	}
}

// oneKeyPaths are decoded paths, each spelled every way spellings knows.
// With -kvserver-rest /storage, /storage/room/a is KvServer's key room/a,
// the store key /room/a; without it, the store key /storage/room/a.
var oneKeyPaths = []string{"/room/a", "/storage/room/a", "/storage/else/a", "/else/a", "/room/", "/storage/room/", "/storage", "/storage/"}

// spellings returns ways to spell the decoded path p in a URL: by
// canonical spellings, which must all name what p names, and others,
// which must name nothing else.
func spellings(p string) (canonical, other map[string]string) {
	plain := keyURL(p)
	slashes := func(f func(i int) string) string { // the slashes after the first
		var b strings.Builder
		b.WriteByte('/')
		for i, part := range strings.Split(plain[1:], "/") {
			if i > 0 {
				b.WriteString(f(i))
			}
			b.WriteString(part)
		}
		return b.String()
	}
	canonical = map[string]string{
		"plain": plain,
		"%2F":   slashes(func(int) string { return "%2F" }),
		"%2f":   slashes(func(int) string { return "%2f" }),
		"mixed": slashes(func(i int) string { return [...]string{"/", "%2F", "%2f"}[i%3] }),
	}
	other = map[string]string{
		"trailing slash":  plain + "/",
		"trailing %2F":    plain + "%2F",
		"dot":             strings.Replace(plain, "/", "/./", 1),
		"%2E":             strings.Replace(plain, "/", "/%2E/", 1),
		"dot-dot":         strings.Replace(plain, "/", "/x/../", 1),
		"%2E%2E and %2F":  strings.Replace(plain, "/", "/x%2F%2E%2E%2F", 1),
		"double slash":    strings.Replace(plain, "/", "//", 1),
		"%2F%2F":          strings.Replace(plain, "/", "/%2F", 1),
		"trailing dot":    plain + "/.",
		"encoded letters": strings.Replace(plain, "o", "%6F", 1),
	}
	return canonical, other
}

// oneKeyMethods are the requests of the one-key test: every method, and
// GET as an event stream.
var oneKeyMethods = []struct {
	name, method, body string
	headers            []string
}{
	{"GET", "GET", "", nil},
	{"HEAD", "HEAD", "", nil},
	{"SSE", "GET", "", []string{"Accept", "text/event-stream"}},
	{"POST", "POST", `{"value":"new"}`, nil},
	{"PUT", "PUT", `{"value":"new"}`, []string{"X-Revision", "1"}},
	{"DELETE", "DELETE", "", nil},
	{"PATCH", "PATCH", `{"value":"new"}`, nil},
	{"OPTIONS", "OPTIONS", "", nil},
}

// tracedRequest is what the server told the tracer about one request.
type tracedRequest struct {
	mu     sync.Mutex
	stages map[string]string // stage → "route name target"
}

func (tr *tracedRequest) record(stage string, rt *route, target string) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.stages[stage] = rt.name + " " + target
}

func (tr *tracedRequest) get(stage string) (string, bool) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	v, ok := tr.stages[stage]
	return v, ok
}

// TestOneKeyPerRequest is SPEC 7's "one key per request", as a property
// over decoded paths × spellings × methods × tokens × -kvserver-rest on
// and off: the target the access check saw is the one the route chose and
// the one the metrics counted (the tracer records each); the key the
// handler read or changed, seen from outside (the store before and after;
// what the answer reveals), is that target; every canonical spelling of a
// path names what the plain one does; and no token ever reads or changes a
// key outside its grants.
func TestOneKeyPerRequest(t *testing.T) {
	var lines []string
	for tok, grants := range oneKeyTokens {
		for _, g := range grants {
			lines = append(lines, fmt.Sprintf("%s %s %s", tok, g.perm, g.path))
		}
	}
	tokens := writeTokens(t, lines...)
	for _, rest := range []bool{false, true} {
		args := []string{"-tokens", tokens}
		if rest {
			args = append(args, "-kvserver-rest", "/storage")
		}
		srv, base := newTestServer(t, args...)
		// The tracer runs on the server's goroutines; a small answer is
		// sent once its handler has returned, so each request's stages
		// come before the next request begins.
		var current atomic.Pointer[tracedRequest]
		srv.tracer = func(stage string, rt *route, target string) { current.Load().record(stage, rt, target) }
		baseline := map[string]string{}
		for _, k := range []string{"/room/a", "/room/b", "/storage/room/a", "/storage/room/b", "/storage/else/a", "/else/a", "/storage"} {
			baseline[k] = string(appendJSONString(nil, k)) // each key holds its own name
		}
		reset := func() {
			for k := range state(srv.store) {
				if _, ok := baseline[k]; !ok {
					srv.store.Delete(k, -1)
				}
			}
			for k, v := range baseline {
				if e := srv.store.Get(k); e == nil || e.value != v || e.revision != 0 {
					srv.store.Delete(k, -1)
					srv.store.Set(k, v, 0)
				}
			}
		}
		reset()
		want := state(srv.store)
		requests, writes, reads := 0, 0, 0
		for _, p := range oneKeyPaths {
			canonical, other := spellings(p)
			for _, m := range oneKeyMethods {
				for tok, grants := range oneKeyTokens {
					covers := func(key string, pm perm) bool {
						return slices.ContainsFunc(grants, func(g grant) bool { return g.allows(key, pm) })
					}
					named := map[string]string{} // canonical spelling → route and target
					for _, set := range []map[string]string{canonical, other} {
						for sp, raw := range set {
							what := fmt.Sprintf("rest=%t %s %s (%s %q) token %q", rest, m.name, raw, sp, p, tok)
							traced := &tracedRequest{stages: map[string]string{}}
							current.Store(traced)
							requests++
							code, revealed := oneKeyRequest(t, base+raw, m.method, m.body, tok, m.headers)
							routed, _ := traced.get("route")
							checked, wasChecked := traced.get("access")
							counted, wasCounted := traced.get("metrics")
							if wasChecked && checked != routed || wasCounted && counted != routed {
								t.Errorf("%s: route %q, access saw %q, metrics counted %q; want one", what, routed, checked, counted)
							}
							target := routed[strings.LastIndexByte(routed, ' ')+1:]
							// Under -kvserver-rest, what is under /storage is
							// KvServer's, whatever the method: no native
							// route acts there.
							if name := strings.TrimSuffix(routed, " "+target); rest && strings.HasPrefix(p, "/storage") && routed != "" &&
								!strings.HasPrefix(name, "REST ") && name != "preflight" && name != "method not allowed" {
								t.Errorf("%s: routed to %q", what, routed)
							}
							if _, ok := canonical[sp]; ok && set["plain"] != "" {
								named[sp] = routed
							}
							// What the handler touched: keys changed, and
							// keys whose value the answer revealed.
							var changed []string
							after := state(srv.store)
							for k, v := range after {
								if want[k] != v {
									changed = append(changed, k)
								}
							}
							for k := range baseline {
								if _, ok := after[k]; !ok {
									changed = append(changed, k)
								}
							}
							for _, k := range changed {
								if k != target || !wasChecked || !covers(k, permWrite) {
									t.Errorf("%s: answered %d, changed %s; the access check saw %q (checked %t)", what, code, k, target, wasChecked)
								}
							}
							for _, k := range revealed {
								if k != target && !(strings.HasSuffix(target, "/") && strings.HasPrefix(k, target)) || !wasChecked || !covers(k, permRead) {
									t.Errorf("%s: answered %d, revealed %s; the access check saw %q (checked %t)", what, code, k, target, wasChecked)
								}
							}
							if len(changed) > 0 {
								writes++
								reset()
							}
							if len(revealed) > 0 {
								reads++
							}
						}
					}
					// Every canonical spelling names what the plain one
					// does: a route and target, or none (refused first).
					for sp, routed := range named {
						if routed != named["plain"] {
							t.Errorf("rest=%t %s %q spelled %s: %q; spelled plainly: %q", rest, m.name, p, sp, routed, named["plain"])
						}
					}
				}
			}
		}
		t.Logf("rest=%t: %d requests, %d wrote, %d read a value", rest, requests, writes, reads)
		if writes == 0 || reads == 0 {
			t.Errorf("rest=%t: %d requests wrote and %d read: the test proves nothing", rest, writes, reads)
		}
	}
}

// oneKeyRequest sends one request of the one-key test and returns its
// status and the keys whose values the answer holds: every key holds its
// own name as a JSON string, so a value tells which key was read.
func oneKeyRequest(t *testing.T, target, method, body, token string, headers []string) (int, []string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second) // a hang breaker
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, target, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if req.Header.Get("Accept") == "text/event-stream" {
		req.URL.RawQuery = "initial" // its state is what a stream reveals
	}
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, target, err)
	}
	defer resp.Body.Close()
	var revealed []string
	if resp.Header.Get("Content-Type") == "text/event-stream" {
		readEvents(t, bufio.NewReader(resp.Body), "", func(ev sseEvent) bool {
			if ev.name == "" && ev.rev >= 0 {
				revealed = append(revealed, ev.key)
			}
			return ev.name != "synced"
		})
		return resp.StatusCode, revealed
	}
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return resp.StatusCode, nil
	}
	var rest struct{ Value json.RawMessage }
	var items []struct{ Key, Value json.RawMessage }
	var one string
	switch {
	case json.Unmarshal(b, &one) == nil:
		revealed = append(revealed, one)
	case json.Unmarshal(b, &items) == nil:
		for _, it := range items {
			var k string
			json.Unmarshal(it.Value, &k)
			revealed = append(revealed, k)
		}
	case json.Unmarshal(b, &rest) == nil && rest.Value != nil:
		json.Unmarshal(rest.Value, &one)
		revealed = append(revealed, one)
	}
	return resp.StatusCode, revealed
}

// TestSpelledSlashUnderREST replays the attack of issue 20: with -tokens
// and -kvserver-rest /storage, a token for /room/ spelled the store key
// /storage/room/a as /storage%2Froom/a, and PUT (which the REST shape
// lacks) wrote native keys under /storage/. Now /storage%2Froom/a is
// /storage/room/a, KvServer's room/a, the store key /room/a, for the
// access check and the handler alike; PUT there is 405.
func TestSpelledSlashUnderREST(t *testing.T) {
	tokens := writeTokens(t, "reader read /room/", "writer write /room/", "other write /storage/")
	srv, url := newTestServer(t, "-tokens", tokens, "-kvserver-rest", "/storage")
	srv.store.Set("/room/a", `"room"`, 0)
	srv.store.Set("/storage/room/a", `"secret"`, 0)
	reader, writer := []string{"Authorization", "Bearer reader"}, []string{"Authorization", "Bearer writer"}
	for _, spelled := range []string{"/storage/room/a", "/storage%2Froom/a", "/storage%2froom%2Fa"} {
		if r := do(t, "GET", url+spelled, "", reader...); r.code != 200 || r.body != `{"value":"room"}` {
			t.Errorf("GET %s with a /room/ reader: %d %s; want KvServer's room/a, the store key /room/a", spelled, r.code, r.body)
		}
		if r := do(t, "GET", url+spelled+"/", "", reader...); r.code != 400 {
			t.Errorf("GET %s/ with a /room/ reader: %d %s; want 400 (KvServer's keys are keys)", spelled, r.code, r.body)
		}
	}
	if r := do(t, "DELETE", url+"/storage%2Froom/a", "", writer...); r.code != 200 || srv.store.Get("/room/a") != nil {
		t.Errorf("DELETE /storage%%2Froom/a with a /room/ writer: %d %s; want /room/a deleted", r.code, r.body)
	}
	for _, token := range [][]string{writer, {"Authorization", "Bearer other"}} {
		if r := do(t, "PUT", url+"/storage/room/x", `"x"`, append(token, "X-Revision", "0")...); r.code != 405 || r.header.Get("Allow") == "" {
			t.Errorf("PUT /storage/room/x: %d %s; want 405 with Allow", r.code, r.body)
		}
	}
	if e := srv.store.Get("/storage/room/a"); e == nil || e.value != `"secret"` {
		t.Errorf("/storage/room/a after the attack: %v; want it untouched", e)
	}
	for _, k := range []string{"/storage/room/x", "/room/x"} {
		if srv.store.Get(k) != nil {
			t.Errorf("PUT /storage/room/x wrote %s", k)
		}
	}
}

// FuzzTargetOf: the path → (route, target) function, as a request meets
// it (cors puts the path in its one form, ServeMux matches a pattern,
// targetOf reads the target). A native route's target is the decoded
// path; a REST route's is the decoded path after the prefix; the plain
// spelling of the decoded path names the same route and target; nothing
// under the REST prefix reaches a native route that acts; and a path
// refused as not canonical is no valid key or path.
func FuzzTargetOf(f *testing.F) {
	for _, seed := range []string{
		"/", "/a", "/a/", "/storage", "/storage/", "/storage/a", "/storage%2Froom/a", "/storage%2froom%2F",
		"/storage/%2E%2E/a", "/a%2F%2Fb", "/%2F", "/a/./b", "/st%6Frage/x", "/storage%2F", "/a%00", "/%E2%82%AC",
	} {
		for m := range 6 {
			f.Add(uint8(m), seed)
		}
	}
	cfg, err := parseConfig([]string{"-kvserver-rest", "/storage"}, func(string) string { return "" }, io.Discard)
	if err != nil {
		f.Fatal(err)
	}
	srv, err := newServer(cfg, discardLogger())
	if err != nil {
		f.Fatal(err)
	}
	srv.routes()
	methods := []string{"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"}
	// resolve returns the route and target of a request for raw, and the
	// decoded path; or refused if cors answered it first.
	resolve := func(method, raw string) (name, target, decoded string, refused, ok bool) {
		r, err := http.NewRequest(method, "http://atomkv"+raw, nil)
		if err != nil || r.URL.Host != "atomkv" || r.URL.RawQuery != "" || r.URL.Fragment != "" {
			return "", "", "", false, false
		}
		refused = true
		srv.cors(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, r.Pattern = srv.mux.Handler(r)
			rt, t := srv.targetOf(r)
			name, target, decoded, refused = rt.name, t, r.URL.Path, false
		})).ServeHTTP(httptest.NewRecorder(), r)
		if refused {
			decoded = r.URL.Path
		}
		return name, target, decoded, refused, true
	}
	f.Fuzz(func(t *testing.T, m uint8, raw string) {
		if !strings.HasPrefix(raw, "/") {
			return
		}
		method := methods[int(m)%len(methods)]
		name, target, decoded, refused, ok := resolve(method, raw)
		switch {
		case !ok:
			return
		case refused:
			if checkPath(decoded, cfg.maxKeyBytes) == nil {
				t.Fatalf("%s %q: refused, but %q is a valid path", method, raw, decoded)
			}
			return
		}
		rest := strings.HasPrefix(name, "REST ")
		switch {
		case rest && "/storage"+target != decoded:
			t.Fatalf("%s %q: %s of %q; the decoded path is %q", method, raw, name, target, decoded)
		case rest && target != "" && target[0] != '/':
			t.Fatalf("%s %q: %s of %q, not a store key", method, raw, name, target)
		case !rest && target != decoded:
			t.Fatalf("%s %q: %s of %q; want the decoded path %q", method, raw, name, target, decoded)
		case !rest && (decoded == "/storage" || strings.HasPrefix(decoded, "/storage/")) && name != "preflight" && name != "method not allowed":
			t.Fatalf("%s %q: %s of %q, a native route under -kvserver-rest /storage", method, raw, name, target)
		}
		if !utf8.ValidString(decoded) {
			return // keyURL would mend it into another path
		}
		name2, target2, _, refused2, ok2 := resolve(method, keyURL(decoded))
		if !ok2 || refused2 || name2 != name || target2 != target {
			t.Fatalf("%s %q: %s of %q; spelled plainly (%q): %s of %q (refused %t)", method, raw, name, target, keyURL(decoded), name2, target2, refused2)
		}
	})
}

// nullWriter is a ResponseWriter that keeps nothing but its header map,
// so a benchmark measures the handler, not a recorder.
type nullWriter struct{ h http.Header }

func (w *nullWriter) Header() http.Header         { return w.h }
func (w *nullWriter) Write(p []byte) (int, error) { return len(p), nil }
func (w *nullWriter) WriteHeader(int)             {}

// BenchmarkRoutes measures a GET and a POST of one small key through the
// whole handler (CORS, routing, the store), without the network.
func BenchmarkRoutes(b *testing.B) {
	for _, method := range []string{"GET", "POST"} {
		b.Run(method, func(b *testing.B) {
			cfg, err := parseConfig(nil, func(string) string { return "" }, io.Discard)
			if err != nil {
				b.Fatal(err)
			}
			srv, _ := newServer(cfg, discardLogger())
			h := srv.routes()
			srv.store.Set("/k/1", `{"v":1}`, 0)
			body := strings.NewReader(`{"v":1}`)
			req, _ := http.NewRequest(method, "http://x/k/1", nil)
			req.Header.Set("Content-Type", "application/json")
			w := &nullWriter{}
			b.ReportAllocs()
			for b.Loop() {
				r := *req
				r.URL = new(*req.URL) // cors may clear RawPath
				*r.URL = *req.URL
				if method == "POST" {
					body.Seek(0, io.SeekStart)
					r.Body, r.ContentLength = io.NopCloser(body), 7
				}
				w.h = http.Header{}
				h.ServeHTTP(w, &r)
			}
		})
	}
}
