package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path"
	"regexp"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestCheckKey(t *testing.T) {
	good := []string{"/a", "/a/b", "/A_b-9", "/ключ", "/日本/語", "/a1/2/3", "/" + strings.Repeat("x", 4095),
		"/a b", "/a:b", "/a.b", "/...", "/.a", "/a..", "/a?b", "/a%20b", "/😀", "/ ", "/\u00a0", "/\u2028", "/a\\b", `/"`}
	bad := map[string]string{
		"":                              "empty",
		"a":                             `must begin with "/"`,
		"/":                             `"/" is every key, not a key`,
		"/a/":                           `ends with "/"`,
		"/a//b":                         "empty component",
		"//a":                           "empty component",
		"/a/./b":                        `"." component`,
		"/..":                           `".." component`,
		"/a/..":                         `".." component`,
		"/a\x00":                        "control character U+0000",
		"/a\x1fb":                       "control character U+001F",
		"/a\x7f":                        "control character U+007F",
		"/a\u0080":                      "control character U+0080",
		"/a\u009f":                      "control character U+009F",
		"/\xff":                         "not valid UTF-8",
		"/\xe2\x82":                     "not valid UTF-8",
		"/\xed\xa0\x80":                 "not valid UTF-8", // a surrogate
		"/" + strings.Repeat("x", 4096): "longer than 4096 bytes",
	}
	for _, k := range good {
		if err := checkKey(k, 4096); err != nil {
			t.Errorf("checkKey(%q): %v; want ok", k, err)
		}
	}
	for k, why := range bad {
		want := fmt.Sprintf("invalid key %s: %s", quoteKey(k), why)
		if err := checkKey(k, 4096); err == nil || !strings.HasPrefix(err.Error(), want) {
			t.Errorf("checkKey(%q): %v; want %s", k, err, want)
		}
	}
	for _, p := range []string{"/", "/a/", "/a/b/", "/a"} {
		if err := checkPath(p, 4096); err != nil {
			t.Errorf("checkPath(%q): %v; want ok", p, err)
		}
	}
	for _, p := range []string{"", "a/", "//", "/a//", "/a\x00/", "a", "/./", "/a/../"} {
		if err := checkPath(p, 4096); err == nil {
			t.Errorf("checkPath(%q): ok; want an error", p)
		}
	}
}

// coverCases is the one table of which paths cover which keys (and
// prefixes): TestCovers runs it through keys.go's covers and
// coveringPaths, TestCoversInJavaScript through client.js's
// coveringPaths. A key spelled KvServer's way (no leading "/") is a case
// of the client's, which sees both spellings; on the server it is the
// same case spelled with the "/".
var coverCases = []struct {
	path, key string
	covered   bool
}{
	{"/a", "/a", true},
	{"/a", "/a/b", false}, // a key covers itself only
	{"/a", "/ab", false},
	{"/b", "/a", false},
	{"/a/", "/a/b", true},
	{"/a/", "/a/b/c", true},
	{"/a/", "/a", false}, // the prefix /a/ is what lies under the key /a
	{"/a/", "/ab", false},
	{"/a/", "/b/a", false},
	{"/a/b/", "/a/b", false},
	{"/a/b/", "/a/c/d", false},
	{"/a/b/", "/a/b/c/d", true},
	{"/", "/a", true},
	{"/", "/a/b/c", true},
	{"/a b/", "/a b/c d", true},
	{"/é/", "/é/ü", true},
	{"/é/", "/é", false},
	{"/x:y/", "/x:y/z", true},
	{"/x:y", "/x:y/z", false},
	// A listing or subscription of a prefix, as a grant must cover it.
	{"/a/", "/a/", true},
	{"/a/", "/a/b/", true},
	{"/a/b/", "/a/", false},
	{"/a", "/a/", false},
	{"/", "/", true},
	{"/a/", "/", false},
	// KvServer's spelling: "" is "/".
	{"room/", "room/a", true},
	{"room", "room/a", false},
	{"room/a", "room/a", true},
	{"", "room/a", true},
	{"", "a", true},
	{"a/", "ab", false},
}

// TestCovers: covers and coveringPaths state one rule: the paths that
// coveringPaths yields for a key are exactly those that cover it, nearest
// first, and the walk allocates nothing (publishing runs it for every
// change).
func TestCovers(t *testing.T) {
	for _, c := range coverCases {
		t.Run(fmt.Sprintf("%s covers %s", c.path, c.key), func(t *testing.T) {
			path, _ := storePath(c.path)
			key, _ := storePath(c.key)
			if got := covers(path, key); got != c.covered {
				t.Errorf("covers(%q, %q) = %t; want %t", path, key, got, c.covered)
			}
			paths := slices.Collect(coveringPaths(key))
			if got := slices.Contains(paths, path); got != c.covered {
				t.Errorf("coveringPaths(%q) = %q: holds %q %t; want %t", key, paths, path, got, c.covered)
			}
			for i, p := range paths {
				if !covers(p, key) || i > 0 && len(p) >= len(paths[i-1]) {
					t.Errorf("coveringPaths(%q) = %q: %q does not cover it, or is not the next nearest", key, paths, p)
				}
			}
			if n := testing.AllocsPerRun(100, func() {
				for p := range coveringPaths(key) {
					_ = p
				}
			}); n != 0 {
				t.Errorf("coveringPaths(%q): %v allocations; want none", key, n)
			}
		})
	}
}

// TestCoversInJavaScript runs coverCases through client.js's
// coveringPaths, in node: the paths it gives each key, spelled as the key
// is, are the server's (coveringPaths, spelled back), so a page routes a
// change to exactly the subscriptions the server sent it for.
func TestCoversInJavaScript(t *testing.T) {
	node := needTool(t, "node", "nodejs")
	js, err := os.ReadFile("client.js")
	if err != nil {
		t.Fatal(err)
	}
	fn := regexp.MustCompile(`(?s)\n    function coveringPaths\(key\) \{\n.*?\n    \}\n`).Find(js)
	if fn == nil {
		t.Fatal("client.js: no `function coveringPaths(key) {…}` at the top level of its closure")
	}
	keys := make([]string, len(coverCases))
	for i, c := range coverCases {
		keys[i] = c.key
	}
	in, _ := json.Marshal(keys)
	script := string(fn) + `
const keys = JSON.parse(require('fs').readFileSync(0, 'utf8'));
process.stdout.write(JSON.stringify(keys.map(coveringPaths)));
`
	cmd := exec.Command(node, "-e", script)
	cmd.Stdin = bytes.NewReader(in)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("node: %v: %s", err, out)
	}
	var got [][]string
	if err := json.Unmarshal(out, &got); err != nil || len(got) != len(coverCases) {
		t.Fatalf("node answered %s (%v); want %d lists of paths", out, err, len(coverCases))
	}
	for i, c := range coverCases {
		t.Run(fmt.Sprintf("%s covers %s", c.path, c.key), func(t *testing.T) {
			key, kvserver := storePath(c.key)
			var want []string
			for p := range coveringPaths(key) {
				want = append(want, spell(p, kvserver))
			}
			if !slices.Equal(got[i], want) {
				t.Errorf("client.js coveringPaths(%q) = %q; want the server's %q", c.key, got[i], want)
			}
			if holds := slices.Contains(got[i], c.path); holds != c.covered {
				t.Errorf("client.js coveringPaths(%q) = %q: holds %q %t; want %t", c.key, got[i], c.path, holds, c.covered)
			}
		})
	}
}

// FuzzCheckKey: an accepted key round-trips unchanged through a URL (as a
// client percent-encodes it and the server decodes it), an SSE id, a JSON
// listing and KvServer's spelling, and is a valid prefix once "/" is
// added.
func FuzzCheckKey(f *testing.F) {
	for _, k := range []string{"/a", "/a/b", "/a//b", "/ключ", "/a/", "/\xff", "/user:42", "/%25", "/x?y#z", `/q"\`, "/a/..", "/ "} {
		f.Add(k)
	}
	f.Fuzz(func(t *testing.T, key string) {
		if checkKey(key, 4096) != nil {
			return
		}
		req, err := http.ReadRequest(bufio.NewReader(strings.NewReader("GET " + keyURL(key) + " HTTP/1.1\r\nHost: x\r\n\r\n")))
		if err != nil || req.URL.Path != key {
			t.Fatalf("key %q through a URL: got %v, %v", key, req, err)
		}
		if path.Clean(key) != key {
			t.Fatalf("key %q is not a clean path: ServeMux would redirect it", key)
		}
		id := string(appendIDKey(nil, key)) + ":7:12345"
		if strings.ContainsAny(id, "\r\n\x00") {
			t.Fatalf("key %q: id %q would break the event stream", key, id)
		}
		if k, rev, seq := parseID(t, id); k != key || rev != 7 || seq != 12345 {
			t.Fatalf("key %q through an SSE id %q: got %q, %d", key, id, k, rev)
		}
		var it struct{ Key string }
		if b := appendItem(nil, item{key, &entry{value: "1"}}, 0); json.Unmarshal(b, &it) != nil || it.Key != key {
			t.Fatalf("key %q through a JSON listing %s: got %q", key, b, it.Key)
		}
		if p, kv := storePath(spell(key, true)); p != key || !kv {
			t.Fatalf("key %q spelled KvServer's way: back to %q", key, p)
		}
		if checkPath(key+"/", 4097) != nil {
			t.Fatalf("key %q + / is not a prefix", key)
		}
	})
}

// keyURL spells a key (or path) for a URL as clients do: each component
// percent-encoded.
func keyURL(key string) string {
	parts := strings.Split(key, "/")
	for i, p := range parts {
		parts[i] = url.PathEscape(p)
	}
	return strings.Join(parts, "/")
}

// oddKeys are keys the seed refused and SPEC section 1 allows.
var oddKeys = []string{
	"/user:42", "/hello world", "/ключ/значение", "/emoji/😀", `/quote"back\slash`, "/a.b", "/%25", "/x?y",
	"/trailing space ", "/a#frag", "/100%", "/a&b=c", "/a+b", "/a;b,c", "/~user/@home", "/$/^/|",
	"/(x)[y]{z}", "/'single'", "/`tick`", "/...", "/.hidden", "/a..b", "/日本語/キー", "/\u00a0nbsp",
	"/line\u2028sep", "/%3A", "/%2F", "/<script>alert(1)</script>", "/room/42/cursor_x",
	"/long/" + strings.Repeat("ж", 2040), // 4086 bytes, near the limit
}

// TestKeysEverywhere takes every odd key through every interface: HTTP
// POST, GET, PUT, DELETE and listing, an SSE stream's id and data, the
// WebSocket with and without the leading "/", and KvServer's REST shape.
func TestKeysEverywhere(t *testing.T) {
	url := startServer(t, "-kvserver-rest", "/storage")
	native, kv := dialWS(t, url, ""), dialWS(t, url, "")
	for i, key := range oddKeys {
		t.Run(fmt.Sprintf("%.40q", key), func(t *testing.T) {
			u := url + keyURL(key)
			value := fmt.Sprintf(`{"key":%s,"i":%d}`, appendKey(nil, key), i)
			if r := do(t, "POST", u, value); r.code != 200 || r.body != `{"revision":0}` {
				t.Fatalf("POST: got %d %s", r.code, r.body)
			}
			if r := do(t, "GET", u, ""); r.code != 200 || r.body != value || r.header.Get("X-Revision") != "0" {
				t.Errorf("GET: got %d %s rev %s; want %s", r.code, r.body, r.header.Get("X-Revision"), value)
			}
			if r := do(t, "PUT", u, `[1]`, "X-Revision", "1"); r.code != 200 {
				t.Errorf("PUT: got %d %s", r.code, r.body)
			}
			var items []listed
			parent := key[:strings.LastIndexByte(key, '/')+1]
			if err := jsonUnmarshal(do(t, "GET", url+keyURL(parent), "", "Accept", "application/json").body, &items); err != nil {
				t.Fatal(err)
			}
			found := false
			for _, it := range items {
				found = found || it.Key == key && it.Revision == 1
			}
			if !found {
				t.Errorf("listing %q: %v holds no %q at revision 1", parent, items, key)
			}
			ev := next(t, subscribe(t, url, keyURL(key)+"?initial"))
			if ev.key != key || ev.rev != 1 || ev.data != `[1]` {
				t.Errorf("SSE: got %q rev %d data %s; want %q rev 1 data [1]", ev.key, ev.rev, ev.data, key)
			}
			k := string(appendKey(nil, key))
			native.roundTrip(`{"type":"get","payload":{"key":`+k+`}}`,
				`{"type":"value","payload":{"key":`+k+`,"value":[1],"revision":1}}`)
			kk := string(appendKey(nil, key[1:]))
			kv.roundTrip(`{"type":"get","payload":{"key":`+kk+`}}`,
				`{"type":"value","payload":{"key":`+kk+`,"value":[1],"revision":1}}`)
			kv.roundTrip(`{"type":"set","payload":{"key":`+kk+`,"value":2},"id":1}`,
				`{"type":"ok","payload":{"key":`+kk+`,"revision":2},"id":1}`)
			if r := do(t, "GET", url+"/storage"+keyURL(key), ""); r.code != 200 || r.body != `{"value":2}` {
				t.Errorf("KvServer REST GET: got %d %s", r.code, r.body)
			}
			if r := do(t, "DELETE", u, ""); r.code != 200 || r.body != `{"deleted":true}` {
				t.Errorf("DELETE: got %d %s", r.code, r.body)
			}
			if r := do(t, "GET", url+"/storage"+keyURL(key), ""); r.code != 204 {
				t.Errorf("KvServer REST GET after DELETE: got %d %s", r.code, r.body)
			}
		})
	}
	if got := listAll(t, url); len(got) != 0 {
		t.Errorf("keys left: %v", got)
	}

	do(t, "POST", url+"/keep", `"safe"`)
	long := "/" + strings.Repeat("x", 4096)
	for _, tt := range []struct{ key, why string }{
		{"/a//b", "empty component"},
		{"/./a", `"." component`},
		{"/a/..", `".." component`},
		{"/a\x01", "control character U+0001"},
		{"/\xff", "not valid UTF-8"},
		{long, "longer than 4096 bytes"},
		{"", ""},
	} {
		t.Run(fmt.Sprintf("invalid %.20q", tt.key), func(t *testing.T) {
			u, want := url+keyURL(tt.key), fmt.Sprintf("invalid key %s: %s", quoteKey(tt.key), tt.why)
			if tt.key == "" {
				u, want = url+"/", `invalid key "/": "/" is every key, not a key`
			}
			for _, method := range []string{"POST", "PUT", "DELETE"} {
				if method == "POST" && tt.key == "" {
					continue // POST / is a transaction (txn_test.go)
				}
				if r := do(t, method, u, `1`, "X-Revision", "0"); r.code != 400 || !strings.HasPrefix(errorMessage(r), want) {
					t.Errorf("%s: got %d %s; want 400 %s", method, r.code, r.body, want)
				}
			}
			if r := do(t, "GET", u, ""); tt.key != "" && (r.code != 400 || !strings.HasPrefix(errorMessage(r), want)) {
				t.Errorf("GET: got %d %s; want 400 %s", r.code, r.body, want)
			}
			if r := do(t, "POST", url+"/storage"+keyURL(tt.key), `{"value":1}`); r.code != 400 {
				t.Errorf("KvServer REST POST: got %d %s; want 400", r.code, r.body)
			}
			for c, k := range map[*wsClient]string{native: tt.key, kv: strings.TrimPrefix(tt.key, "/")} {
				key := appendJSONString(nil, k)
				if !utf8.ValidString(k) {
					key = appendKey(nil, k) // as it is: json.Marshal would mend it
				}
				c.send(`{"type":"set","payload":{"key":` + string(key) + `,"value":1}}`)
				var msg struct{ Type, Payload string }
				why := tt.why
				if k == "" {
					why = "empty"
				}
				if got := c.recvRaw(); json.Unmarshal([]byte(got), &msg) != nil || msg.Type != "error" || !strings.Contains(msg.Payload, why) {
					t.Errorf("WebSocket set of %.40q: got %.200s; want an error: %s", k, got, why)
				}
			}
		})
	}
	if got := listAll(t, url); len(got) != 1 || got[0].Key != "/keep" {
		t.Errorf("after bad keys: keys %v; want /keep alone", got)
	}
}

// TestKvServerKeys is a KvServer client's session, which never writes a
// leading "/": every reply and event names keys as it does, HTTP sees the
// same keys with the "/", and a key watched under both spellings gets an
// event under each.
func TestKvServerKeys(t *testing.T) {
	url := startServer(t)
	c := dialWS(t, url, "")
	steps := []struct{ send, want string }{
		{`{"type":"subscribe","payload":{"key":"room/"},"id":1}`, `{"type":"ok","payload":{"key":"room/"},"id":1}`},
		{`{"type":"subscribe","payload":{"key":"user:42"}}`, ``},
		{`{"type":"set","payload":{"key":"user:42","value":{"n":"ann"}}}`, `{"type":"value","payload":{"key":"user:42","value":{"n":"ann"},"revision":0,"seq":_}}`},
		{`{"type":"get","payload":{"key":"user:42"}}`, `{"type":"value","payload":{"key":"user:42","value":{"n":"ann"},"revision":0}}`},
		{`{"type":"get","payload":{"key":"nobody"}}`, `{"type":"no-value","payload":{"key":"nobody"}}`},
		{`HTTP POST /room/a 1`, `{"type":"value","payload":{"key":"room/a","value":1,"revision":0,"seq":_}}`},
		{`HTTP POST /user:42 2`, `{"type":"value","payload":{"key":"user:42","value":2,"revision":1,"seq":_}}`},
		{`{"type":"set","payload":{"key":"room/t","value":"brief","ttl":"50ms"}}`, `{"type":"value","payload":{"key":"room/t","value":"brief","revision":0,"seq":_}}` +
			"\n" + `{"type":"no-value","payload":{"key":"room/t","reason":"expired","seq":_}}`},
		{`{"type":"list","payload":{"prefix":"room/"}}`, `{"type":"values","payload":[{"key":"room/a","value":1,"revision":0}]}`},
		{`{"type":"update","payload":{"key":"room/a","value":5,"revision":0}}`, `{"type":"conflict","payload":{"key":"room/a","value":1,"revision":0}}`},
		{`{"type":"delete","payload":{"key":"user:42"},"id":"d"}`, `{"type":"no-value","payload":{"key":"user:42","reason":"deleted","seq":_}}` +
			"\n" + `{"type":"ok","payload":{"key":"user:42"},"id":"d"}`},
		{`HTTP GET /user:42`, `404`},
		{`{"type":"unsubscribe","payload":{"key":"room/"},"id":2}`, `{"type":"ok","payload":{"key":"room/"},"id":2}`},
		{`HTTP POST /room/b 1`, ``},
		{`{"type":"get","payload":{"key":"room/b"}}`, `{"type":"value","payload":{"key":"room/b","value":1,"revision":0}}`},
	}
	for _, st := range steps {
		if method, rest, ok := strings.Cut(st.send, " "); ok && method == "HTTP" {
			f := strings.Fields(rest)
			body := ""
			if len(f) > 2 {
				body = f[2]
			}
			r := do(t, f[0], url+keyURL(f[1]), body)
			if f[0] == "GET" {
				if fmt.Sprint(r.code) != st.want {
					t.Errorf("%s: got %d; want %s", st.send, r.code, st.want)
				}
				continue
			}
		} else {
			c.send(st.send)
		}
		for want := range strings.SplitSeq(st.want, "\n") {
			if want != "" {
				if got := c.recv(); got != want {
					t.Errorf("after %s\n got %s\nwant %s", st.send, got, want)
				}
			}
		}
	}

	t.Run("two spellings", func(t *testing.T) {
		c := dialWS(t, url, "")
		c.roundTrip(`{"type":"subscribe","payload":{"key":"both"},"id":1}`, `{"type":"ok","payload":{"key":"both"},"id":1}`)
		c.roundTrip(`{"type":"subscribe","payload":{"key":"/both"},"id":2}`, `{"type":"ok","payload":{"key":"/both"},"id":2}`)
		do(t, "POST", url+"/both", `7`)
		got := []string{c.recv(), c.recv()}
		want := map[string]bool{
			`{"type":"value","payload":{"key":"both","value":7,"revision":0,"seq":_}}`:  true,
			`{"type":"value","payload":{"key":"/both","value":7,"revision":0,"seq":_}}`: true,
		}
		if got[0] == got[1] || !want[got[0]] || !want[got[1]] {
			t.Errorf("one change watched as both and /both: got\n%s\n%s\nwant one event under each spelling", got[0], got[1])
		}
		c.roundTrip(`{"type":"unsubscribe","payload":{"key":"both"},"id":3}`, `{"type":"ok","payload":{"key":"both"},"id":3}`)
		do(t, "POST", url+"/both", `8`)
		if got, want := c.recv(), `{"type":"value","payload":{"key":"/both","value":8,"revision":1,"seq":_}}`; got != want {
			t.Errorf("after unsubscribing both: got %s; want %s", got, want)
		}
		c.roundTrip(`{"type":"get","payload":{"key":"both"}}`, `{"type":"value","payload":{"key":"both","value":8,"revision":1}}`)
	})
}

// BenchmarkCheckKey checks a typical 40-byte key.
func BenchmarkCheckKey(b *testing.B) {
	key := "/rooms/4217/members/user_42/cursor_pos-x" // 40 bytes
	if len(key) != 40 {
		b.Fatalf("key is %d bytes", len(key))
	}
	for b.Loop() {
		if checkKey(key, 4096) != nil {
			b.Fatal("refused")
		}
	}
}
