package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// TestBrowserOnePage runs testdata/onepage.html in headless Chromium: the
// client carrying a page's subscriptions and requests on one WebSocket,
// through reconnects, server restarts with and without -data, a cut in
// the middle of requests, and a proxy that refuses the upgrade.
//
// The page reaches the restartable server through cutter, a TCP proxy
// the page drives: it restarts the server behind it, keeps the page out
// while the test changes the store, holds the page's bytes and cuts its
// connections. A second server sits behind refuser, an HTTP proxy that
// answers every WebSocket upgrade with 502.
func TestBrowserOnePage(t *testing.T) {
	chromium := needChromium(t)
	main := startBackend(t, "-heartbeat", "100ms", "-data", t.TempDir())
	proxy := newCutter(t, main.addr())
	_, refused := newTestServer(t)
	refuser := httptest.NewServer(refuseUpgrades(refused))
	t.Cleanup(refuser.Close)

	page, err := os.ReadFile("testdata/onepage.html")
	if err != nil {
		t.Fatal(err)
	}
	server := strings.Replace(proxy.url(), "127.0.0.1", "localhost", 1) // another origin than the page's
	page = bytes.ReplaceAll(page, []byte("{{SERVER}}"), []byte(server))
	page = bytes.ReplaceAll(page, []byte("{{REFUSING}}"), []byte(strings.Replace(refuser.URL, "127.0.0.1", "localhost", 1)))
	second := fmt.Appendf(nil, `<!doctype html><meta charset="utf-8"><script src="%s/"></script>`, server)

	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) { w.Write(page) })
	mux.HandleFunc("GET /second.html", func(w http.ResponseWriter, r *http.Request) { w.Write(second) })
	// What the server holds: subscriptions registered, and open event
	// streams and WebSockets.
	mux.HandleFunc("GET /held", func(w http.ResponseWriter, r *http.Request) {
		srv := main.server()
		fmt.Fprintf(w, `{"subscriptions":%d,"websockets":%d,"streams":%d}`,
			srv.store.subs.count.Load(), srv.metrics.ws.Load(), srv.metrics.sse.Load())
	})
	// restart stops the server and starts it again, with its data
	// directory or (data=0) without, and keeps the page out until open.
	mux.HandleFunc("POST /restart", func(w http.ResponseWriter, r *http.Request) {
		proxy.shut()
		main.restart(r.URL.Query().Get("data") != "0")
		proxy.target(main.addr())
	})
	mux.HandleFunc("POST /open", func(w http.ResponseWriter, r *http.Request) { proxy.open() })
	// store changes the store behind the page's back.
	mux.HandleFunc("POST /store", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		srv := main.server()
		if v := q.Get("value"); v != "" {
			srv.store.Set(q.Get("key"), v, 0)
		} else {
			srv.store.Delete(q.Get("key"), -1)
		}
	})
	mux.HandleFunc("POST /hold", func(w http.ResponseWriter, r *http.Request) { proxy.hold() })
	mux.HandleFunc("GET /holding", func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, proxy.holding()) })
	mux.HandleFunc("POST /cut", func(w http.ResponseWriter, r *http.Request) { proxy.cut() })

	results := browse(t, chromium, mux)
	checkResults(t, results, []string{
		"two pages, 60 subscriptions, one socket each",
		"one path thrice, and a prefix inside another",
		"many subscriptions with their state while a writer writes",
		"a restart with -data resumes every subscription",
		"a restart without -data resets, and reports what is gone",
		"a cut in the middle of requests",
		"a quiet live subscription resumes too",
		"a fresh page: one key live and with its state at once",
		"large values, and one over the limit",
		"a proxy that refuses the upgrade",
		"a bad key rejects, it does not throw",
		"transport websocket never falls back",
	})
}

// backend is a server the test can stop and start again, on another
// port, with the same data directory (if it has one).
type backend struct {
	t    *testing.T
	args []string

	mu    sync.Mutex
	srv   *server
	hs    *httptest.Server
	close func() // the server, its streams and its data
}

func startBackend(t *testing.T, args ...string) *backend {
	b := &backend{t: t, args: args}
	b.start(b.args)
	t.Cleanup(b.stop)
	return b
}

// start serves a server as newTestServer does.
func (b *backend) start(args []string) {
	srv, hs, stop := serveTestServer(b.t, args)
	b.mu.Lock()
	b.srv, b.hs, b.close = srv, hs, stop
	b.mu.Unlock()
}

// stop closes the server, its streams and sockets, and its data.
func (b *backend) stop() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.hs == nil {
		return
	}
	b.close()
	b.hs = nil
}

// restart stops the server and starts another, with the data directory
// or without.
func (b *backend) restart(data bool) {
	b.stop()
	args := b.args
	if !data {
		if i := slices.Index(args, "-data"); i >= 0 {
			args = slices.Delete(slices.Clone(args), i, i+2)
		}
	}
	b.start(args)
}

func (b *backend) server() *server {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.srv
}

func (b *backend) addr() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.hs.Listener.Addr().String()
}

// cutter is a TCP proxy in front of a server, which the test can shut
// (connections are refused), point elsewhere, hold (what the client
// sends is counted and kept back) and cut (every connection closed).
type cutter struct {
	ln net.Listener

	mu      sync.Mutex
	to      string // "" while shut
	pending string // where to after open
	holdOn  bool
	held    int
	clients map[net.Conn]net.Conn // client → server
}

func newCutter(t *testing.T, to string) *cutter {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &cutter{ln: ln, to: to, clients: make(map[net.Conn]net.Conn)}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				c.serve(conn)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		c.shut()
		wg.Wait()
	})
	return c
}

func (c *cutter) url() string { return "http://" + c.ln.Addr().String() }

func (c *cutter) serve(client net.Conn) {
	defer client.Close()
	c.mu.Lock()
	to := c.to
	c.mu.Unlock()
	if to == "" {
		return
	}
	server, err := net.Dial("tcp", to)
	if err != nil {
		return
	}
	defer server.Close()
	c.mu.Lock()
	c.clients[client] = server
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.clients, client)
		c.mu.Unlock()
	}()
	done := make(chan struct{})
	go func() {
		io.Copy(client, server)
		client.Close()
		close(done)
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := client.Read(buf)
		c.mu.Lock()
		held := c.holdOn
		if held {
			c.held += n
		}
		c.mu.Unlock()
		if !held && n > 0 {
			if _, err := server.Write(buf[:n]); err != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	server.Close()
	<-done
}

// shut refuses new connections and closes the open ones.
func (c *cutter) shut() {
	c.mu.Lock()
	c.to = ""
	c.mu.Unlock()
	c.cut()
}

// target points the proxy at another server, still shut until open.
func (c *cutter) target(to string) {
	c.mu.Lock()
	c.pending = to
	c.mu.Unlock()
}

func (c *cutter) open() {
	c.mu.Lock()
	c.to = c.pending
	c.mu.Unlock()
}

func (c *cutter) hold() {
	c.mu.Lock()
	c.holdOn, c.held = true, 0
	c.mu.Unlock()
}

func (c *cutter) holding() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.held
}

// cut closes every connection, what was held with them, and holds no
// more.
func (c *cutter) cut() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for client, server := range c.clients {
		client.Close()
		server.Close()
	}
	c.holdOn = false
}

// refuseUpgrades proxies HTTP to the server at base and answers every
// WebSocket upgrade with 502, as a proxy that does not pass them does.
func refuseUpgrades(base string) http.Handler {
	u, _ := url.Parse(base)
	proxy := httputil.NewSingleHostReverseProxy(u)
	proxy.FlushInterval = -1 // event streams flow as they come
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if isWebSocket(r) {
			http.Error(w, "this proxy does not pass WebSockets", http.StatusBadGateway)
			return
		}
		proxy.ServeHTTP(w, r)
	})
}

// TestClientDeclarations checks that client.d.ts declares every member
// of AtomKV that client.js defines, and nothing it does not.
func TestClientDeclarations(t *testing.T) {
	js, err := os.ReadFile("client.js")
	if err != nil {
		t.Fatal(err)
	}
	dts, err := os.ReadFile("client.d.ts")
	if err != nil {
		t.Fatal(err)
	}
	defined := map[string]bool{}
	// Members of the literal `const self = {…};` and `self.name =`.
	literal := regexp.MustCompile(`(?s)const self = \{(.*?)\n    \};`).FindSubmatch(js)
	if literal == nil {
		t.Fatal("client.js: no `const self = {…};`")
	}
	for _, m := range regexp.MustCompile(`(?m)^        (\w+):`).FindAllSubmatch(literal[1], -1) {
		defined[string(m[1])] = true
	}
	for _, m := range regexp.MustCompile(`(?m)^    self\.(\w+) =`).FindAllSubmatch(js, -1) {
		defined[string(m[1])] = true
	}
	iface := regexp.MustCompile(`(?s)interface AtomKVClient \{(.*?)\n\}`).FindSubmatch(dts)
	if iface == nil {
		t.Fatal("client.d.ts: no `interface AtomKVClient {…}`")
	}
	declared := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^    (?:readonly )?(\w+)\??[:(<]`).FindAllSubmatch(iface[1], -1) {
		declared[string(m[1])] = true
	}
	if len(defined) < 10 {
		t.Fatalf("found only %d members in client.js: %v", len(defined), defined)
	}
	for name := range defined {
		if !declared[name] {
			t.Errorf("client.js defines AtomKV.%s; client.d.ts does not declare it", name)
		}
	}
	for name := range declared {
		if !defined[name] {
			t.Errorf("client.d.ts declares AtomKV.%s; client.js does not define it", name)
		}
	}
	if !bytes.Contains(dts, []byte("declare const AtomKV: AtomKVClient;")) {
		t.Error("client.d.ts does not declare the global AtomKV")
	}
}

// TestClientTypes type-checks a TypeScript page against client.d.ts with
// tsc, where it is installed (npm install -g typescript@5), and checks
// that misuses of the API are refused.
func TestClientTypes(t *testing.T) {
	tsc, err := exec.LookPath("tsc")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("tsc is not installed; .ci/run installs it (npm install -g typescript@5)")
		}
		t.Skip("tsc is not installed (npm install -g typescript@5)")
	}
	dts, err := filepath.Abs("client.d.ts")
	if err != nil {
		t.Fatal(err)
	}
	// One tsc run over every file (it is slow to start); each error line
	// names its file.
	dir := t.TempDir()
	files := map[string]string{}
	write := func(name, code string) {
		path := filepath.Join(dir, name+".ts")
		src := fmt.Sprintf("/// <reference path=%q />\nexport {};\n%s\n", dts, code)
		if err := os.WriteFile(path, []byte(src), 0o600); err != nil {
			t.Fatal(err)
		}
		files[name] = path
	}
	page := `
AtomKV.BASE = 'http://localhost:8000';
AtomKV.token = '';
AtomKV.transport = 'auto';
AtomKV.onstatus = (status, transport) => {
    const offline: boolean = status !== 'open';
    console.log(offline, transport === 'http');
};
async function main(): Promise<void> {
    const [n, rev] = await AtomKV.get<number>('/counter');
    const ok: boolean = await AtomKV.update('/counter', (n ?? 0) + 1, rev + 1, {ttl: '1h'});
    const r: number = await AtomKV.set('/a', {nested: [1, 'two', null]}, {ttl: 1500});
    const gone: boolean = await AtomKV.delete('/a', {revision: r});
    for (const item of await AtomKV.list('/room/')) {
        console.log(item.key, item.value, item.revision, item.ttl ?? 'permanent', ok, gone);
    }
    for await (const [key, value, revision] of AtomKV.subscribe<string>('/room/', {initial: true})) {
        if (revision === -1) console.log(key, 'deleted');
        else console.log(key, value?.toUpperCase());
        break;
    }
    try {
        await AtomKV.set('/b', 1);
    } catch (err) {
        if (err instanceof Error && err.name === 'OutcomeUnknownError') console.log('maybe applied');
    }
    let after: string | null | undefined = '';
    while (typeof after === 'string') {
        const page: AtomKVListing<AtomKVItem<number>> = await AtomKV.list<number>('/room/', {limit: 100, after});
        for (const item of page) console.log(item.key, item.value + 1);
        after = page.next;
        const seq: number | undefined = page.seq;
        console.log(seq);
    }
    for (const item of await AtomKV.list('/room/', {shallow: true})) {
        if ('prefix' in item) console.log(item.prefix);
        else console.log(item.key, item.revision);
    }
    const t = await AtomKV.transaction({
        check: [{key: '/a', revision: 3}, {key: '/b', revision: -1}],
        ops: [{op: 'set', key: '/a', value: {x: 1}, ttl: '5s'}, {op: 'delete', key: '/c'}],
    });
    if (t.ok) console.log(t.seq, t.revisions['/a']);
    else for (const c of t.conflicts) console.log(c.key, c.value, c.revision);
    const fib = await AtomKV.transact<[[number, number]]>(['/fib'], ([[a, b]]) => [[b, a + b]]);
    if (fib) console.log(fib[0]?.[1]);
    const moved = await AtomKV.transact<[number | null, number | null, string | null]>(['/x', '/y', '/z'], ([x, y]) => {
        if (x === null || x < 1) return undefined;
        return [x - 1, (y ?? 0) + 1, AtomKV.DELETE];
    }, {retries: 5});
    console.log(moved);
    await AtomKV.transact(['/n'], async ([n]) => [typeof n === 'number' ? n + 1 : 0]);
}
main();
`
	write("page", page)
	wrong := map[string]string{
		"set-without-value":   `AtomKV.set('/a');`,
		"bad-transport":       `AtomKV.transport = 'sse';`,
		"revision-as-string":  `AtomKV.update('/a', 1, '2');`,
		"bad-status":          `AtomKV.onstatus = (s) => { if (s === 'offline') {} };`,
		"undefined-value":     `AtomKV.set('/a', undefined);`,
		"txn-unknown-op":      `AtomKV.transaction({ops: [{op: 'put', key: '/a', value: 1}]});`,
		"txn-no-ops":          `AtomKV.transaction({check: [{key: '/a', revision: 0}]});`,
		"delete-with-value":   `AtomKV.transaction({ops: [{op: 'delete', key: '/a', value: 1}]});`,
		"transact-wrong-type": `AtomKV.transact<[number]>(['/n'], ([n]) => ['one']);`,
		"limit-as-string":     `AtomKV.list('/a/', {limit: '3'});`,
		"prefix-item-key":     `AtomKV.list('/a/', {shallow: true}).then((p) => p[0].key);`,
		"delete-is-readonly":  `AtomKV.DELETE = Symbol();`,
	}
	for name, code := range wrong {
		write(name, code)
	}
	args := []string{"--noEmit", "--strict", "--target", "es2022", "--lib", "es2022,dom"}
	for _, path := range files {
		args = append(args, path)
	}
	out, _ := exec.Command(tsc, args...).CombinedOutput()
	errorsOf := func(name string) int { return strings.Count(string(out), name+".ts(") }
	if errorsOf("page") > 0 {
		t.Errorf("a correct page does not type-check:\n%s", out)
	}
	for name, code := range wrong {
		if errorsOf(name) == 0 {
			t.Errorf("%s: %s type-checks; want an error", name, code)
		}
	}
}

// TestBrowserLoad measures the client in headless Chromium (ATOMKV_LOAD=1):
// a page opening 1,000 subscriptions and receiving one event on each, its
// JS heap and the server's heap for them, and requests per second from
// one page over the socket and over fetch. It asserts nothing about speed.
func TestBrowserLoad(t *testing.T) {
	needLoad(t)
	chromium := needChromium(t)
	srv, server := newTestServer(t)
	for i := range 1000 {
		srv.store.Set("/load/k"+strconv.Itoa(i), "0", 0)
	}
	page, err := os.ReadFile("testdata/load.html")
	if err != nil {
		t.Fatal(err)
	}
	page = bytes.ReplaceAll(page, []byte("{{SERVER}}"), []byte(strings.Replace(server, "127.0.0.1", "localhost", 1)))
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) { w.Write(page) })
	mux.HandleFunc("GET /heap", func(w http.ResponseWriter, r *http.Request) {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		fmt.Fprint(w, m.HeapAlloc)
	})
	mux.HandleFunc("POST /writeall", func(w http.ResponseWriter, r *http.Request) {
		for i := range 1000 {
			srv.store.Set("/load/k"+strconv.Itoa(i), "1", 0)
		}
	})
	results := browse(t, chromium, mux, "--enable-precise-memory-info", "--js-flags=--expose-gc")
	checkResults(t, results, []string{"figures"})
	if len(results) == 1 {
		var figures map[string]int
		json.Unmarshal([]byte(results[0].Detail), &figures)
		names := slices.Sorted(maps.Keys(figures))
		for _, name := range names {
			t.Logf("%-40s %d", name, figures[name])
		}
	}
}

// TestBrowserTransactions runs testdata/txn.html in headless Chromium:
// list pages (limit, after, shallow), transaction and transact through
// the client, over the WebSocket and over fetch; a transaction cut off
// in flight; two pages transacting on the same keys at once, each
// watching them and seeing every transaction whole.
//
// The page reaches the server through cutter, which holds its bytes and
// cuts its connections when the page asks.
func TestBrowserTransactions(t *testing.T) {
	chromium := needChromium(t)
	main := startBackend(t)
	proxy := newCutter(t, main.addr())
	page, err := os.ReadFile("testdata/txn.html")
	if err != nil {
		t.Fatal(err)
	}
	server := strings.Replace(proxy.url(), "127.0.0.1", "localhost", 1) // another origin than the page's
	page = bytes.ReplaceAll(page, []byte("{{SERVER}}"), []byte(server))
	second := fmt.Appendf(nil, `<!doctype html><meta charset="utf-8"><script src="%s/"></script>`, server)

	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) { w.Write(page) })
	mux.HandleFunc("GET /second.html", func(w http.ResponseWriter, r *http.Request) { w.Write(second) })
	mux.HandleFunc("GET /held", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, `{"subscriptions":%d}`, main.server().store.subs.count.Load())
	})
	mux.HandleFunc("POST /hold", func(w http.ResponseWriter, r *http.Request) { proxy.hold() })
	mux.HandleFunc("GET /holding", func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, proxy.holding()) })
	mux.HandleFunc("POST /cut", func(w http.ResponseWriter, r *http.Request) { proxy.cut() })

	results := browse(t, chromium, mux)
	checkResults(t, results, []string{
		"list pages over the socket",
		"list pages over fetch",
		"transactions over the socket",
		"transactions over fetch",
		"a transaction cut off in flight",
		"transact: fibonacci, abort, leave, delete, retries",
		"nested subscriptions take a transaction once",
		"two pages transact on the same keys",
		"two pages transact on the same keys, one over fetch",
	})
}
