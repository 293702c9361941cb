package main

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// The real binary, as deploy/Dockerfile builds it, behind real Caddy and
// real nginx, each configured from its recipe in deploy/, and real
// clients through them: Go's HTTP/2 client, x/net's WebSocket, headless
// Chromium with client.js.

// proxied is a proxy in front of the server, as a client sees it.
type proxied struct {
	base   string      // https://127.0.0.1:port
	tls    *tls.Config // trusts the proxy's certificate
	client *http.Client
	srv    *process
	// The server's -heartbeat, and how long the proxy lets a connection
	// be quiet (0: no limit): the tests scale both down in one ratio.
	heartbeat, idleTimeout time.Duration
}

func newProxied(base string, roots *x509.CertPool, srv *process, heartbeat, idleTimeout time.Duration) *proxied {
	cfg := &tls.Config{RootCAs: roots}
	return &proxied{
		base: base, tls: cfg, srv: srv, heartbeat: heartbeat, idleTimeout: idleTimeout,
		client: &http.Client{Transport: &http.Transport{TLSClientConfig: cfg, ForceAttemptHTTP2: true}},
	}
}

// testHeartbeat is the -heartbeat of the servers behind proxies: short,
// so that proxyIdle and proxyWebSocketIdle see many in little time.
const testHeartbeat = 200 * time.Millisecond

// startUpstream runs the binary deploy/Dockerfile builds, as the server
// behind a proxy: on loopback, with its admin listener, and testHeartbeat.
func startUpstream(t *testing.T) *process {
	t.Helper()
	return startBinary(t, buildStatic(t), "-addr", "127.0.0.1:0", "-admin-addr", "127.0.0.1:0", "-heartbeat", testHeartbeat.String())
}

// waitServing waits until the proxy answers GET / over HTTPS.
func (p *proxied) waitServing(t *testing.T, name string) {
	t.Helper()
	waitFor(t, name+" to serve HTTPS", func() bool {
		resp, err := p.client.Get(p.base + "/")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil && resp.StatusCode == 200
	})
}

// TestProxyCaddy runs the real binary behind real Caddy, configured by
// deploy/Caddyfile: HTTPS from Caddy's internal CA, HTTP/2 to clients.
func TestProxyCaddy(t *testing.T) {
	caddy := needTool(t, "caddy", "caddy")
	srv := startUpstream(t)

	dir := t.TempDir()
	recipe, _ := filepath.Abs("deploy/Caddyfile")
	cmd, base := caddyCommand(t, caddy, dir, recipe, "ATOMKV_UPSTREAM="+strings.TrimPrefix(srv.url, "http://"))
	runProxy(t, cmd, "")

	// Caddy makes its CA, then the site's certificate, then serves.
	root := filepath.Join(dir, "data", "pki", "authorities", "local", "root.crt")
	var roots *x509.CertPool
	waitFor(t, "Caddy's certificate authority", func() bool {
		pem, err := os.ReadFile(root)
		if err != nil {
			return false
		}
		roots = x509.NewCertPool()
		return roots.AppendCertsFromPEM(pem)
	})
	p := newProxied(base, roots, srv, testHeartbeat, 0)
	p.waitServing(t, "Caddy")
	throughProxy(t, p)
}

// TestProxyNginx runs the real binary behind real nginx, configured by
// deploy/nginx.conf, with a certificate made for the test.
func TestProxyNginx(t *testing.T) {
	nginx := needTool(t, "nginx", "nginx")
	recipe, err := os.ReadFile("deploy/nginx.conf")
	if err != nil {
		t.Fatal(err)
	}
	// The recipe's timeouts outlast the heartbeat, or quiet streams and
	// WebSockets would be cut by nginx between two heartbeats.
	cfg, _ := parseConfig(nil, func(string) string { return "" }, io.Discard)
	m := regexp.MustCompile(`\n        proxy_read_timeout (\d+)s;\n        proxy_send_timeout (\d+)s;\n`).FindStringSubmatch(string(recipe))
	if m == nil || m[1] != m[2] {
		t.Fatal("deploy/nginx.conf sets no proxy_read_timeout and equal proxy_send_timeout in seconds")
	}
	timeout, _ := strconv.Atoi(m[1])
	if time.Duration(timeout)*time.Second < 2*cfg.heartbeat {
		t.Errorf("proxy_read_timeout %ds; want at least twice -heartbeat (%v)", timeout, cfg.heartbeat)
	}
	// Both scaled down in that ratio, so that proxyIdle and
	// proxyWebSocketIdle can see a stream and a WebSocket outlive the
	// timeout in a second or two.
	idle := time.Duration(timeout) * time.Second / (cfg.heartbeat / testHeartbeat)
	srv := startUpstream(t)

	dir := t.TempDir()
	port := freePort(t)
	certFile, keyFile, roots := testCertificate(t, dir)
	// The recipe with this test's address, certificate and upstream (the
	// lines a user edits) and its timeouts scaled down; nothing else.
	cmd := nginxCommand(t, nginx, dir, "deploy/nginx.conf", string(recipe), [][2]string{
		{m[0], fmt.Sprintf("\n        proxy_read_timeout %[1]dms;\n        proxy_send_timeout %[1]dms;\n", idle.Milliseconds())},
		{"    listen 443 ssl http2;\n", fmt.Sprintf("    listen 127.0.0.1:%d ssl http2;\n", port)},
		{"    listen [::]:443 ssl http2;\n", ""},
		{"/etc/letsencrypt/live/kv.example.com/fullchain.pem", certFile},
		{"/etc/letsencrypt/live/kv.example.com/privkey.pem", keyFile},
		{"proxy_pass http://127.0.0.1:8000;", "proxy_pass " + srv.url + ";"},
	})
	runProxy(t, cmd, filepath.Join(dir, "error.log"))
	p := newProxied(fmt.Sprintf("https://127.0.0.1:%d", port), roots, srv, testHeartbeat, idle)
	p.waitServing(t, "nginx")
	throughProxy(t, p)
}

// runProxy starts a proxy. The test's end stops it with SIGTERM, and if
// the test failed shows what it said: its output, and its log file if
// it has one.
func runProxy(t *testing.T, cmd *exec.Cmd, logFile string) {
	t.Helper()
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		if t.Failed() {
			var logged []byte
			if logFile != "" {
				logged, _ = os.ReadFile(logFile)
			}
			t.Logf("%s said:\n%s%s", filepath.Base(cmd.Path), out.String(), logged)
		}
	})
}

// testCertificate writes a self-signed certificate for 127.0.0.1 and its
// key into dir, and returns their files and a pool that trusts it.
func testCertificate(t *testing.T, dir string) (certFile, keyFile string, roots *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA:         true, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(key)
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	os.WriteFile(certFile, certPEM, 0o644)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600)
	roots = x509.NewCertPool()
	roots.AppendCertsFromPEM(certPEM)
	return certFile, keyFile, roots
}

// throughProxy runs what a client does, through the proxy: each HTTP
// method, an event stream that gets a change and resumes, a WebSocket
// session, a quiet stream and a quiet WebSocket that outlive the proxy's
// idle timeout, and client.js in Chromium with more than six
// subscriptions.
func throughProxy(t *testing.T, p *proxied) {
	t.Run("http", func(t *testing.T) { proxyHTTP(t, p) })
	t.Run("sse", func(t *testing.T) { proxySSE(t, p) })
	t.Run("latency", func(t *testing.T) { proxyLatency(t, p) })
	t.Run("idle", func(t *testing.T) { proxyIdle(t, p) })
	t.Run("websocket", func(t *testing.T) { proxyWebSocket(t, p) })
	t.Run("websocket-idle", func(t *testing.T) { proxyWebSocketIdle(t, p) })
	t.Run("browser", func(t *testing.T) { proxyBrowser(t, p) })
}

// request sends a request through the proxy; headers are name, value
// pairs.
func (p *proxied) request(ctx context.Context, method, path, body string, headers ...string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, p.base+path, strings.NewReader(body))
	if err != nil {
		return nil, err
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	return p.client.Do(req)
}

// send does one request through the proxy and reads its answer.
func (p *proxied) send(t *testing.T, method, path, body string, headers ...string) (response, string) {
	t.Helper()
	resp, err := p.request(context.Background(), method, path, body, headers...)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return response{resp.StatusCode, resp.Header, string(b)}, resp.Proto
}

func proxyHTTP(t *testing.T, p *proxied) {
	steps := []struct {
		method, path, body string
		headers            []string
		code               int
		rev, want          string // X-Revision and body; "" for any
	}{
		{"POST", "/deploy/a", `{"n": 1}`, nil, 200, "0", `{"revision":0}`},
		{"GET", "/deploy/a", "", nil, 200, "0", `{"n":1}`},
		{"PUT", "/deploy/a", `2`, []string{"X-Revision", "1"}, 200, "1", ""},
		{"PUT", "/deploy/a", `3`, []string{"X-Revision", "1"}, 409, "1", `2`},
		{"GET", "/deploy/", "", nil, 200, "", `[{"key":"/deploy/a","value":2,"revision":1}]`},
		{"DELETE", "/deploy/a", "", nil, 200, "", ""},
		{"GET", "/deploy/a", "", nil, 404, "-1", `{"error":"no such key"}`},
	}
	for _, s := range steps {
		r, proto := p.send(t, s.method, s.path, s.body, s.headers...)
		if proto != "HTTP/2.0" {
			t.Errorf("%s %s went over %s; want HTTP/2.0", s.method, s.path, proto)
		}
		if r.code != s.code || (s.rev != "" && r.header.Get("X-Revision") != s.rev) || (s.want != "" && r.body != s.want) {
			t.Errorf("%s %s: got %d X-Revision %q %.80s; want %d %q %s", s.method, s.path, r.code, r.header.Get("X-Revision"), r.body, s.code, s.rev, s.want)
		}
		if r.header.Get("Access-Control-Allow-Origin") != "*" {
			t.Errorf("%s %s: the CORS header did not come through", s.method, s.path)
		}
	}
	// A value too large is 413, from AtomKV or from the proxy (nginx's
	// client_max_body_size), never a 502.
	if r, _ := p.send(t, "POST", "/deploy/big", `"`+strings.Repeat("x", 1<<20)+`"`); r.code != 413 {
		t.Errorf("POST of a value over 1 MiB: got %d %.100q; want 413", r.code, r.body)
	}
}

// stream opens an event stream through the proxy.
func (p *proxied) stream(t *testing.T, path string, headers ...string) (*bufio.Reader, func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	resp, err := p.request(ctx, "GET", path, "", append([]string{"Accept", "text/event-stream"}, headers...)...)
	if err != nil {
		cancel()
		t.Fatalf("stream %s: %v", path, err)
	}
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" || resp.Proto != "HTTP/2.0" {
		cancel()
		t.Fatalf("stream %s: got %d %s over %s; want 200 text/event-stream over HTTP/2.0", path, resp.StatusCode, resp.Header.Get("Content-Type"), resp.Proto)
	}
	return bufio.NewReader(resp.Body), func() { cancel(); resp.Body.Close() }
}

// proxySSE: a stream through the proxy gets a change as it is made (a
// proxy that buffers would hold it: the server sends nothing after it),
// and resumes with Last-Event-ID, getting just what it missed.
func proxySSE(t *testing.T, p *proxied) {
	events, stop := p.stream(t, "/live/?initial")
	lastID := readEvents(t, events, "", func(ev sseEvent) bool { return ev.name != "synced" })

	if r, _ := p.send(t, "POST", "/live/x", `"first"`); r.code != 200 {
		t.Fatalf("POST: %d %s", r.code, r.body)
	}
	var got sseEvent
	lastID = readEvents(t, events, lastID, func(ev sseEvent) bool { got = ev; return false })
	if got.key != "/live/x" || got.data != `"first"` {
		t.Fatalf("got %v; want /live/x:0=\"first\"", got)
	}
	stop()

	p.send(t, "POST", "/live/y", `"missed"`)
	events, stop = p.stream(t, "/live/?initial", "Last-Event-ID", lastID)
	defer stop()
	var resumed []string
	readEvents(t, events, lastID, func(ev sseEvent) bool {
		resumed = append(resumed, ev.String())
		return ev.name != "synced"
	})
	if len(resumed) != 2 || resumed[0] != `/live/y:0="missed"` || !strings.HasPrefix(resumed[1], "synced@") {
		t.Errorf("resumed with %v; want just /live/y:0=\"missed\", then synced", resumed)
	}
}

// proxyLatency logs how long a change takes to reach an event stream
// through the proxy and one straight from the server, both open at once,
// each change written straight to the server: medians of 21 rounds, and
// their ratio (docs/performance.md). It asserts nothing of them.
func proxyLatency(t *testing.T, p *proxied) {
	arrivals := func(r *bufio.Reader) <-chan time.Time {
		ch := make(chan time.Time, 64)
		go readEvents(t, r, "", func(ev sseEvent) bool {
			if ev.name == "" {
				ch <- time.Now()
			}
			return true
		})
		return ch
	}
	proxiedStream, stop := p.stream(t, "/latency/")
	defer stop()
	req, _ := http.NewRequest("GET", p.srv.url+"/latency/", nil)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	viaProxy, direct := arrivals(proxiedStream), arrivals(bufio.NewReader(resp.Body))

	const rounds = 21
	var proxyTimes, directTimes []time.Duration
	for i := range rounds {
		start := time.Now()
		if r := do(t, "POST", p.srv.url+"/latency/k", strconv.Itoa(i)); r.code != 200 {
			t.Fatalf("POST: %d %s", r.code, r.body)
		}
		for _, c := range []struct {
			ch    <-chan time.Time
			times *[]time.Duration
		}{{viaProxy, &proxyTimes}, {direct, &directTimes}} {
			select {
			case at := <-c.ch:
				*c.times = append(*c.times, at.Sub(start))
			case <-time.After(20 * time.Second): // a hang breaker, not a timing assertion
				t.Fatalf("round %d: no event", i)
			}
		}
	}
	median := func(d []time.Duration) time.Duration {
		slices.Sort(d)
		return d[len(d)/2]
	}
	mp, md := median(proxyTimes), median(directTimes)
	t.Logf("a change written to the server reaches a stream through the proxy in %v, straight from the server in %v (medians of %d): %.2f×",
		mp.Round(time.Microsecond), md.Round(time.Microsecond), rounds, float64(mp)/float64(md))
}

// quietBeats is how many heartbeats (or pings) of a quiet connection
// span more than twice the proxy's idle timeout, or 2 s if it has none.
func (p *proxied) quietBeats() int {
	quiet := 2 * p.idleTimeout
	if quiet == 0 {
		quiet = 2 * time.Second // the proxy has no idle timeout: show it
	}
	return int(quiet/p.heartbeat) + 1
}

// proxyIdle: a quiet event stream outlives the proxy's idle timeout: its
// heartbeats keep it open for more than twice that timeout (counted in
// heartbeats, which the stream brings: nothing here sleeps), and a change
// after them still arrives.
func proxyIdle(t *testing.T, p *proxied) {
	events, stop := p.stream(t, "/idle/")
	defer stop()
	want := p.quietBeats()
	for beats := 0; beats < want; {
		line, err := events.ReadString('\n')
		if err != nil {
			t.Fatalf("the quiet stream ended after %d heartbeats of %v (proxy idle timeout %v): %v", beats, p.heartbeat, p.idleTimeout, err)
		}
		if strings.HasPrefix(line, ":") {
			beats++
		}
	}
	p.send(t, "POST", "/idle/k", `"still here"`)
	var got sseEvent
	readEvents(t, events, "", func(ev sseEvent) bool { got = ev; return false })
	if got.key != "/idle/k" || got.data != `"still here"` {
		t.Errorf("after %d heartbeats: got %v; want /idle/k:0=\"still here\"", want, got)
	}
}

// proxyWebSocket: a session of the WebSocket API through the proxy.
func proxyWebSocket(t *testing.T, p *proxied) {
	cfg, err := websocket.NewConfig(strings.Replace(p.base, "https://", "wss://", 1)+"/", p.base)
	if err != nil {
		t.Fatal(err)
	}
	cfg.TlsConfig = p.wsTLS()
	ws, err := websocket.DialConfig(cfg)
	if err != nil {
		t.Fatalf("WebSocket through the proxy: %v", err)
	}
	defer ws.Close()
	c := &wsClient{t: t, ws: ws}
	c.roundTrip(`{"type":"subscribe","payload":{"key":"/ws/"},"id":1}`, `{"type":"ok","payload":{"key":"/ws/"},"id":1}`)
	c.send(`{"type":"set","payload":{"key":"/ws/a","value":[1,2]},"id":2}`)
	for _, want := range []string{
		`{"type":"value","payload":{"key":"/ws/a","value":[1,2],"revision":0,"seq":_}}`,
		`{"type":"ok","payload":{"key":"/ws/a","revision":0},"id":2}`,
	} {
		if got := c.recv(); got != want {
			t.Errorf("got %s; want %s", got, want)
		}
	}
	// A change made elsewhere (over HTTP) arrives as an event.
	p.send(t, "DELETE", "/ws/a", "")
	if got, want := c.recv(), `{"type":"no-value","payload":{"key":"/ws/a","reason":"deleted","seq":_}}`; got != want {
		t.Errorf("got %s; want %s", got, want)
	}
}

// wsTLS is the TLS configuration of a WebSocket through the proxy: a
// WebSocket is an HTTP/1.1 upgrade.
func (p *proxied) wsTLS() *tls.Config {
	cfg := p.tls.Clone()
	cfg.NextProtos = []string{"http/1.1"}
	return cfg
}

// rawWebSocket opens a WebSocket through the proxy, handshake and all,
// and returns the bare connection, for frames read one by one (readFrame)
// with the server's pings among them; the test's end closes it.
func (p *proxied) rawWebSocket(t *testing.T) (net.Conn, *bufio.Reader) {
	t.Helper()
	conn, err := tls.Dial("tcp", strings.TrimPrefix(p.base, "https://"), p.wsTLS())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	req, _ := http.NewRequest("GET", p.base+"/", nil)
	for _, h := range [][2]string{
		{"Upgrade", "websocket"}, {"Connection", "Upgrade"}, {"Origin", p.base},
		{"Sec-WebSocket-Version", "13"}, {"Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="}, // RFC 6455's example
	} {
		req.Header.Set(h[0], h[1])
	}
	if err := req.Write(conn); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(conn) // what follows the answer stays in r
	resp, err := http.ReadResponse(r, req)
	if err != nil {
		t.Fatalf("WebSocket handshake through the proxy: %v", err)
	}
	if resp.StatusCode != 101 || resp.Header.Get("Sec-WebSocket-Accept") != "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" {
		t.Fatalf("WebSocket handshake through the proxy: %s, Sec-WebSocket-Accept %q", resp.Status, resp.Header.Get("Sec-WebSocket-Accept"))
	}
	return conn, r
}

// proxyWebSocketIdle: a quiet WebSocket outlives the proxy's idle timeout
// as a quiet stream does. Subscribed, with nothing changing, it gets the
// server's ping after each -heartbeat of silence and answers it, for
// more than twice that timeout (counted in pings, which the connection
// brings: nothing here sleeps); a change after them still arrives.
func proxyWebSocketIdle(t *testing.T, p *proxied) {
	conn, r := p.rawWebSocket(t)
	pings := 0
	// next reads frames, answering each ping, until a message comes (it
	// returns it) or enough pings have come (it returns "").
	next := func(enough int) string {
		t.Helper()
		for pings < enough {
			op, payload, err := readFrame(t, conn, r)
			switch {
			case err != nil:
				t.Fatalf("the quiet WebSocket ended after %d pings (-heartbeat %v, proxy idle timeout %v): %v", pings, p.heartbeat, p.idleTimeout, err)
			case op == opPing:
				pings++
				conn.Write(clientFrame(true, opPong, payload))
			case op == opText:
				return seqField.ReplaceAllString(string(payload), `"seq":_`)
			default:
				t.Fatalf("after %d pings: got frame %d %q", pings, op, payload)
			}
		}
		return ""
	}
	const always = 1 << 30 // for next: until a message
	conn.Write(clientFrame(true, opText, []byte(`{"type":"subscribe","payload":{"key":"/idle-ws/"},"id":1}`)))
	if got, want := next(always), `{"type":"ok","payload":{"key":"/idle-ws/"},"id":1}`; got != want {
		t.Fatalf("subscribe: got %s; want %s", got, want)
	}
	want := pings + p.quietBeats()
	if got := next(want); got != "" {
		t.Fatalf("the quiet WebSocket got %s", got)
	}
	p.send(t, "POST", "/idle-ws/k", `"still here"`)
	if got, want := next(always), `{"type":"value","payload":{"key":"/idle-ws/k","value":"still here","revision":0,"seq":_}}`; got != want {
		t.Errorf("after %d pings: got %s; want %s", pings, got, want)
	}
}

// proxyBrowser loads client.js from the proxy over HTTPS in headless
// Chromium, in two frames: one with the default transport, one forced to
// EventSource and fetch ("http"). Each opens more than six
// subscriptions, writes each key, gets every event, then makes one more
// request: over HTTP/1.1 the seventh stream and that request would wait
// for one of the six connections a browser allows a host. HTTP/2
// carries them all on one. (Chromium hides the protocol of a resource
// from another origin, so the page cannot report it; the Go client's
// requests above check HTTP/2 itself.)
func proxyBrowser(t *testing.T, p *proxied) {
	chromium := needTool(t, "chromium", "chromium")
	reports := make(chan []byte, 2)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, `<!doctype html><iframe src="/frame?transport=auto"></iframe><iframe src="/frame?transport=http"></iframe>`)
	})
	mux.HandleFunc("GET /frame", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, proxyFrame, p.base, r.URL.Query().Get("transport"))
	})
	mux.HandleFunc("POST /report", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		reports <- b
	})
	// open answers how many event streams and WebSockets the server has
	// open, from its /metrics.
	mux.HandleFunc("GET /open", func(w http.ResponseWriter, r *http.Request) {
		m := scrape(t, p.srv.admin)
		fmt.Fprintf(w, `{"streams":%g,"websockets":%g}`, m["atomkv_open_streams"], m["atomkv_open_websockets"])
	})
	pages := httptest.NewServer(mux)
	defer pages.Close()

	// The WebSockets of the subtests before are closed: from here every
	// one the server counts is the page's.
	waitFor(t, "the server to close the earlier WebSockets", func() bool {
		return scrape(t, p.srv.admin)["atomkv_open_websockets"] == 0
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	log := startChromium(t, ctx, chromium, pages.URL+"/", "--ignore-certificate-errors")
	for range 2 {
		var report struct {
			Transport, Detail string
			OK                bool
			Status            []string
			Open              struct{ Streams, WebSockets int }
		}
		select {
		case b := <-reports:
			if err := json.Unmarshal(b, &report); err != nil {
				t.Fatalf("report %s: %v", b, err)
			}
		case <-ctx.Done():
			t.Fatalf("no report from the page; chromium said:\n%s", consoleLines(log.String()))
		}
		t.Logf("transport %s: onstatus %v; with its subscriptions open the server had %d event streams and %d WebSockets",
			report.Transport, report.Status, report.Open.Streams, report.Open.WebSockets)
		if !report.OK {
			t.Errorf("transport %s: %s", report.Transport, report.Detail)
		}
		// The client reports its transport (AtomKV.onstatus): the
		// default one must be the WebSocket, one for the page, and the
		// server must count it (the other frame opens none, and the
		// earlier subtests' are closed); the forced one must be
		// EventSource, its 8 streams open at once.
		want := map[string]string{"auto": "websocket", "http": "http"}[report.Transport]
		for _, s := range report.Status {
			if !strings.HasSuffix(s, ":"+want) {
				t.Errorf("transport %s: onstatus reported %s; want only %s", report.Transport, s, want)
			}
		}
		if !slices.Contains(report.Status, "open:"+want) {
			t.Errorf("transport %s: onstatus reported %v; want open:%s", report.Transport, report.Status, want)
		}
		if report.Transport == "auto" && report.Open.WebSockets != 1 {
			t.Errorf("transport auto: the server had %d WebSockets open; want the page's one", report.Open.WebSockets)
		}
		if report.Transport == "http" && report.Open.Streams < 8 {
			t.Errorf("transport http: %d event streams open; want the frame's 8 at once", report.Open.Streams)
		}
	}
}

// proxyFrame is the page of one frame of proxyBrowser: %[1]s is the
// proxy, %[2]s the transport.
const proxyFrame = `<!doctype html>
<script src="%[1]s/"></script>
<script>
(async () => {
    const transport = '%[2]s';
    const report = {transport, ok: false, status: [], detail: ''};
    if (transport !== 'auto') {
        AtomKV.transport = transport;
    }
    AtomKV.onstatus = (status, via) => report.status.push(status + ':' + via);
    const n = 8, prefix = '/browser/' + transport + '/';
    const timer = setTimeout(() => send('timed out: ' + report.detail), 20000);
    function send(detail) {
        report.detail = detail;
        fetch('/report', {method: 'POST', body: JSON.stringify(report)});
    }
    try {
        const subs = [];
        for (let i = 0; i < n; i++) {
            subs.push(AtomKV.subscribe(prefix + i, {initial: true}));
        }
        report.detail = 'waiting for the initial states';
        const initial = await Promise.all(subs.map((s) => s.next()));
        for (let i = 0; i < n; i++) {
            const [key, value, rev] = initial[i].value;
            if (key !== prefix + i || value !== null || rev !== -1) {
                throw new Error('initial state ' + JSON.stringify(initial[i].value));
            }
        }
        report.detail = 'waiting for the changes';
        const changes = subs.map((s) => s.next());
        await Promise.all(subs.map((_, i) => AtomKV.set(prefix + i, i)));
        const got = await Promise.all(changes);
        for (let i = 0; i < n; i++) {
            const [key, value, rev] = got[i].value;
            if (key !== prefix + i || value !== i || rev !== 0) {
                throw new Error('change ' + JSON.stringify(got[i].value));
            }
        }
        report.open = await (await fetch('/open')).json();
        report.detail = 'waiting for a request beside the subscriptions';
        const [value] = await AtomKV.get(prefix + 3);
        if (value !== 3) {
            throw new Error('get: ' + value);
        }
        await Promise.all(subs.map((s) => s.return()));
        report.ok = true;
        clearTimeout(timer);
        send('');
    } catch (err) {
        clearTimeout(timer);
        send(String(err));
    }
})();
</script>
`

// nginxCommand writes, in dir, an nginx configuration whose server is
// site, the recipe (named so in a failure) with each edit {old, new}
// made once: the lines a user edits made the test's, which fails if the
// recipe no longer has one. It returns the command that runs nginx in the
// foreground, its log in dir/error.log.
func nginxCommand(t *testing.T, nginx, dir, recipe, site string, edits [][2]string) *exec.Cmd {
	t.Helper()
	for _, e := range edits {
		if !strings.Contains(site, e[0]) {
			t.Fatalf("%s no longer has %q", recipe, e[0])
		}
		site = strings.Replace(site, e[0], e[1], 1)
	}
	os.WriteFile(filepath.Join(dir, "atomkv.conf"), []byte(site), 0o644)
	config := fmt.Sprintf(`daemon off;
master_process off;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log notice;
events { worker_connections 1024; }
http {
	access_log off;
	client_body_temp_path %[1]s/body;
	proxy_temp_path %[1]s/proxy;
	fastcgi_temp_path %[1]s/fastcgi;
	uwsgi_temp_path %[1]s/uwsgi;
	scgi_temp_path %[1]s/scgi;
	include %[1]s/atomkv.conf;
}
`, dir)
	os.WriteFile(filepath.Join(dir, "nginx.conf"), []byte(config), 0o644)
	cmd := exec.Command(nginx, "-p", dir, "-c", filepath.Join(dir, "nginx.conf"), "-e", filepath.Join(dir, "error.log"))
	return cmd
}

// caddyCommand returns the command that runs Caddy on the recipe (a
// Caddyfile's absolute path) as it is, imported under the global options
// of a test: no admin endpoint, Caddy's own CA, loopback and free ports,
// every file in dir; and the site's base URL, which the recipe reads as
// ATOMKV_SITE. env adds to Caddy's environment.
func caddyCommand(t *testing.T, caddy, dir, recipe string, env ...string) (*exec.Cmd, string) {
	t.Helper()
	port := freePort(t)
	config := fmt.Sprintf(`{
	admin off
	local_certs
	skip_install_trust
	default_bind 127.0.0.1
	http_port %d
	https_port %d
	storage file_system %s
}
import %s
`, freePort(t), port, filepath.Join(dir, "data"), recipe)
	os.WriteFile(filepath.Join(dir, "Caddyfile"), []byte(config), 0o644)
	base := fmt.Sprintf("https://127.0.0.1:%d", port)
	cmd := exec.Command(caddy, "run", "--config", filepath.Join(dir, "Caddyfile"), "--adapter", "caddyfile")
	cmd.Env = append([]string{
		"PATH=" + os.Getenv("PATH"), "HOME=" + dir,
		"XDG_DATA_HOME=" + filepath.Join(dir, "xdg-data"), "XDG_CONFIG_HOME=" + filepath.Join(dir, "xdg-config"),
		"ATOMKV_SITE=" + base,
	}, env...)
	return cmd, base
}
