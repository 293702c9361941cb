package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// The server's semantics through every way of running it (SPEC 12:
// "everything above holds across nodes as on one"): each test of
// semantics runs on each setup. A setup or a test is one line of its
// table.

// A deployment is the servers a setup runs for one test: one URL each.
// A client may send any request to any of them.
type deployment struct {
	urls []string
}

// url returns a server for the next request, any of them at random: in a
// cluster, a client's requests go to either node.
func (d *deployment) url() string { return d.urls[rand.IntN(len(d.urls))] }

// node returns server i, modulo their number: a test that wants a stream
// on one node and another on the next says so.
func (d *deployment) node(i int) string { return d.urls[i%len(d.urls)] }

// startFunc starts a deployment of a setup for one test, with flags
// added; it stops when the test ends.
type startFunc func(t *testing.T, flags ...string) *deployment

// setups are the ways of running the server. open is called once per
// setup, before its tests, and makes what they share (a cluster's etcd).
var setups = []struct {
	name string
	open func(t *testing.T) startFunc
}{
	{"memory", alone(false)},
	{"data", alone(true)},
	{"cluster", clusterSetup(2)},
}

// semantics are the tests every setup must pass.
var semantics = []struct {
	name string
	test func(t *testing.T, start startFunc)
}{
	{"cas", testCAS},
	{"ttl", testTTL},
	{"events", testEvents},
	{"resume", testResume},
	{"txn", testTxn},
	{"bank", testBank},
}

func TestSetups(t *testing.T) {
	t.Parallel()
	for _, s := range setups {
		t.Run(s.name, func(t *testing.T) {
			t.Parallel()
			start := s.open(t)
			for _, sem := range semantics {
				t.Run(sem.name, func(t *testing.T) {
					t.Parallel()
					sem.test(t, start)
				})
			}
		})
	}
}

// alone is a server alone, in memory or with -data.
func alone(data bool) func(*testing.T) startFunc {
	return func(*testing.T) startFunc {
		return func(t *testing.T, flags ...string) *deployment {
			t.Helper()
			if data {
				flags = append([]string{"-data", t.TempDir()}, flags...)
			}
			return &deployment{urls: []string{startServer(t, flags...)}}
		}
	}
}

// clusterSetup is n nodes over a one-member etcd, which the setup's tests
// share, each test's nodes under a prefix of their own.
func clusterSetup(n int) func(*testing.T) startFunc {
	return func(t *testing.T) startFunc {
		c := startEtcd(t, 1)
		return func(t *testing.T, flags ...string) *deployment {
			t.Helper()
			d := new(deployment)
			for _, node := range startNodes(t, c, n, flags...) {
				d.urls = append(d.urls, node.url)
			}
			return d
		}
	}
}

// call sends one request, and returns its answer or why there is none;
// unlike do, it may run on any goroutine.
func call(method, url, body string, headers ...string) (response, error) {
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, r)
	if err != nil {
		return response{}, err
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	resp, err := client.Do(req)
	if err != nil {
		return response{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return response{resp.StatusCode, resp.Header, string(b)}, err
}

// xRevision is an answer's X-Revision, or -2 if it has none.
func xRevision(r response) int64 {
	rev, err := strconv.ParseInt(r.header.Get("X-Revision"), 10, 64)
	if err != nil {
		return -2
	}
	return rev
}

// serverMsg is a WebSocket message of the server's, as far as the tests read
// it; raw is the whole message.
type serverMsg struct {
	Type    string          `json:"type"`
	ID      json.RawMessage `json:"id"`
	Payload struct {
		Key      string          `json:"key"`
		Value    json.RawMessage `json:"value"`
		Revision *int64          `json:"revision"`
		Seq      int64           `json:"seq"`
		Reason   string          `json:"reason"`
		More     bool            `json:"more"`
	} `json:"payload"`
	raw string
}

// String gives an event as key:revision=value, key:-1 reason (a
// missing key's reason may be empty), synced, reset, or another message
// as it came.
func (m serverMsg) String() string {
	p := m.Payload
	switch m.Type {
	case "value":
		return fmt.Sprintf("%s:%d=%s", p.Key, *p.Revision, p.Value)
	case "no-value":
		return strings.TrimSpace(fmt.Sprintf("%s:-1 %s", p.Key, p.Reason))
	case "synced", "reset":
		return m.Type
	}
	return m.raw
}

// wsOpen dials url's WebSocket, sends msgs, and returns the server's
// messages as they arrive; the channel closes with the connection, which
// the test's end closes. It reads on its own goroutine, and fails no
// test itself.
func wsOpen(t testing.TB, url string, msgs ...string) <-chan serverMsg {
	t.Helper()
	cfg, err := websocket.NewConfig(strings.Replace(url, "http://", "ws://", 1)+"/", "http://localhost/")
	if err != nil {
		t.Fatal(err)
	}
	ws, err := websocket.DialConfig(cfg)
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	t.Cleanup(func() { ws.Close() })
	for _, m := range msgs {
		if err := websocket.Message.Send(ws, m); err != nil {
			t.Fatalf("send %s: %v", m, err)
		}
	}
	ch := make(chan serverMsg, 1024)
	go func() {
		defer close(ch)
		for {
			var raw string
			if err := websocket.Message.Receive(ws, &raw); err != nil {
				return
			}
			m := serverMsg{raw: raw}
			json.Unmarshal([]byte(raw), &m) // a payload that is no object (an error, a list) stays in raw
			ch <- m
		}
	}()
	return ch
}

// wsNext returns the next message, failing the test if none comes.
func wsNext(t testing.TB, ch <-chan serverMsg) serverMsg {
	t.Helper()
	select {
	case m, ok := <-ch:
		if !ok {
			t.Fatal("WebSocket closed")
		}
		return m
	case <-time.After(20 * time.Second): // a hang breaker, longer than a lease's grace
		t.Fatal("no WebSocket message")
	}
	return serverMsg{}
}

// wsSubscribed subscribes a new connection to path on url (with payload
// members extra, e.g. `,"initial":true`) and returns its messages after
// the subscription's ok.
func wsSubscribed(t testing.TB, url, path, extra string) <-chan serverMsg {
	t.Helper()
	ch := wsOpen(t, url, fmt.Sprintf(`{"type":"subscribe","id":"sub","payload":{"key":%q%s}}`, path, extra))
	if m := wsNext(t, ch); m.Type != "ok" || string(m.ID) != `"sub"` {
		t.Fatalf("subscribe %s: got %s; want its ok", path, m.raw)
	}
	return ch
}

// sseEvents reads n events (named ones included) from ch.
func sseEvents(t testing.TB, ch <-chan sseEvent, n int) []sseEvent {
	t.Helper()
	var evs []sseEvent
	for range n {
		select {
		case ev, ok := <-ch:
			if !ok {
				t.Fatalf("the stream closed after %s", eventStrings(evs))
			}
			evs = append(evs, ev)
		case <-time.After(20 * time.Second): // a hang breaker
			t.Fatalf("no event after %s", eventStrings(evs))
		}
	}
	return evs
}

// eventStrings is what events say, each as its String.
func eventStrings[E fmt.Stringer](evs []E) string {
	var s []string
	for _, ev := range evs {
		s = append(s, ev.String())
	}
	return strings.Join(s, " ")
}

// mustDo sends a request to url and fails the test unless the answer has
// code.
func mustDo(t testing.TB, code int, method, url, body string, headers ...string) response {
	t.Helper()
	r := do(t, method, url, body, headers...)
	if r.code != code {
		t.Fatalf("%s %s %s: got %d %s; want %d", method, url, body, r.code, r.body, code)
	}
	return r
}

// testCAS: compare-and-swap (PUT's X-Revision, DELETE's), and a counter
// that concurrent clients increment with it, each request to any server.
func testCAS(t *testing.T, start startFunc) {
	d := start(t)
	for _, st := range []struct {
		method, key, body, rev string
		code                   int
		wantBody, wantRev      string
	}{
		{"PUT", "/cas/a", `"x"`, "0", 200, `{"revision":0}`, "0"},
		{"PUT", "/cas/a", `"y"`, "0", 409, `"x"`, "0"},
		{"PUT", "/cas/a", `"y"`, "1", 200, `{"revision":1}`, "1"},
		{"PUT", "/cas/a", `"z"`, "1", 409, `"y"`, "1"},
		{"PUT", "/cas/a", `"z"`, "3", 409, `"y"`, "1"},
		{"GET", "/cas/a", "", "", 200, `"y"`, "1"},
		{"DELETE", "/cas/a", "", "0", 409, `"y"`, "1"},
		{"DELETE", "/cas/a", "", "1", 200, `{"deleted":true}`, ""},
		{"GET", "/cas/a", "", "", 404, `{"error":"no such key"}`, "-1"},
		{"PUT", "/cas/a", `1`, "5", 409, `null`, "-1"},
		{"DELETE", "/cas/a", "", "0", 409, `null`, "-1"},
		{"PUT", "/cas/a", `"again"`, "0", 200, `{"revision":0}`, "0"},
		{"DELETE", "/cas/a", "", "", 200, `{"deleted":true}`, ""},
		{"DELETE", "/cas/a", "", "", 200, `{"deleted":false}`, ""},
	} {
		var h []string
		if st.rev != "" {
			h = []string{"X-Revision", st.rev}
		}
		r := do(t, st.method, d.url()+st.key, st.body, h...)
		if r.code != st.code || r.body != st.wantBody || st.wantRev != "" && r.header.Get("X-Revision") != st.wantRev {
			t.Fatalf("%s %s %s (X-Revision %s): got %d %s, X-Revision %q; want %d %s, X-Revision %q",
				st.method, st.key, st.body, st.rev, r.code, r.body, r.header.Get("X-Revision"), st.code, st.wantBody, st.wantRev)
		}
	}

	// WebSocket update: ok, then a conflict with the current state.
	ws := wsOpen(t, d.url(),
		`{"type":"update","id":1,"payload":{"key":"/cas/w","value":1,"revision":0}}`,
		`{"type":"update","id":2,"payload":{"key":"/cas/w","value":2,"revision":0}}`)
	for _, want := range []string{
		`{"type":"ok","payload":{"key":"/cas/w","revision":0},"id":1}`,
		`{"type":"conflict","payload":{"key":"/cas/w","value":1,"revision":0},"id":2}`,
	} {
		if m := wsNext(t, ws); m.raw != want {
			t.Errorf("got %s; want %s", m.raw, want)
		}
	}

	// A counter: each client reads it and writes the next value at the
	// next revision, again on a conflict. No increment is lost.
	const clients, each = 4, 15
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for done := 0; done < each; {
				r, err := call("GET", d.url()+"/cas/n", "")
				if err != nil {
					errs <- err
					return
				}
				n, rev := 0, int64(-1)
				if r.code == 200 {
					n, _ = strconv.Atoi(r.body)
					rev = xRevision(r)
				}
				w, err := call("PUT", d.url()+"/cas/n", strconv.Itoa(n+1), "X-Revision", strconv.FormatInt(rev+1, 10))
				switch {
				case err != nil:
					errs <- err
					return
				case w.code == 200:
					done++
				case w.code != 409:
					errs <- fmt.Errorf("PUT /cas/n: %d %s", w.code, w.body)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for _, url := range d.urls {
		if r := do(t, "GET", url+"/cas/n", ""); r.body != strconv.Itoa(clients*each) || xRevision(r) != clients*each-1 {
			t.Errorf("the counter on %s: %s at revision %d; want %d at %d", url, r.body, xRevision(r), clients*each, clients*each-1)
		}
	}
}

// watchers are an SSE stream and a WebSocket subscription of one path on
// each server of a deployment (the WebSocket on the next server's).
type watchers struct {
	t   *testing.T
	d   *deployment
	sse []<-chan sseEvent
	ws  []<-chan serverMsg
}

func watchAll(t *testing.T, d *deployment, path string) *watchers {
	t.Helper()
	w := &watchers{t: t, d: d}
	for i := range d.urls {
		w.sse = append(w.sse, subscribe(t, d.node(i), path))
		w.ws = append(w.ws, wsSubscribed(t, d.node(i+1), path, ""))
	}
	return w
}

// expect reads the next event of every stream, which must say wantSSE
// (as sseEvent.String) or wantWS (as serverMsg.String), and returns the
// SSE ids and the WebSocket seqs and "more"s. A test reads each change's
// events before it makes the next: a subscriber that does not keep up
// may get a newer change of a key in place of an older (SPEC 4).
func (w *watchers) expect(wantSSE, wantWS string) (ids, seqs []string) {
	w.t.Helper()
	for i := range w.sse {
		ev := sseEvents(w.t, w.sse[i], 1)[0]
		if ev.String() != wantSSE {
			w.t.Errorf("SSE on %s: %s; want %s", w.d.node(i), ev, wantSSE)
		}
		m := wsNext(w.t, w.ws[i])
		if m.String() != wantWS {
			w.t.Errorf("WebSocket on %s: %s; want %s", w.d.node(i+1), m.raw, wantWS)
		}
		ids = append(ids, ev.id)
		seqs = append(seqs, fmt.Sprint(m.Payload.Seq, m.Payload.More))
	}
	return ids, seqs
}

// testTTL: a key written with a TTL reports it, and is gone at its
// deadline: one expiry event on every stream, with the same seq, and no
// server returns it after; a write without a TTL makes a key permanent;
// an expired key starts again at revision 0.
func testTTL(t *testing.T, start startFunc) {
	d := start(t)
	w := watchAll(t, d, "/ttl/")
	mustDo(t, 200, "POST", d.url()+"/ttl/long?ttl=1h", `"long"`)
	w.expect(`/ttl/long:0="long"`, `/ttl/long:0="long"`)
	mustDo(t, 200, "POST", d.url()+"/ttl/p", `"p"`, "X-TTL", "200ms")
	w.expect(`/ttl/p:0="p"`, `/ttl/p:0="p"`)
	mustDo(t, 200, "POST", d.url()+"/ttl/p", `"p2"`) // permanent now
	w.expect(`/ttl/p:1="p2"`, `/ttl/p:1="p2"`)
	mustDo(t, 200, "POST", d.url()+"/ttl/k", `1`, "X-TTL", "200ms")
	w.expect(`/ttl/k:0=1`, `/ttl/k:0=1`)
	for _, url := range d.urls {
		r := mustDo(t, 200, "GET", url+"/ttl/long", "")
		if ms, err := strconv.ParseInt(r.header.Get("X-TTL"), 10, 64); err != nil || ms <= 0 || ms > 3600_000 {
			t.Errorf("GET /ttl/long on %s: X-TTL %q; want the milliseconds left of 1h", url, r.header.Get("X-TTL"))
		}
	}
	// /ttl/p's first deadline is before /ttl/k's: had it expired, its
	// event would come before /ttl/k's expiry.
	ids, seqs := w.expect(`/ttl/k:-1=null`, `/ttl/k:-1 expired`)
	expiry := seqOf(ids[0])
	for i := range ids {
		if seqOf(ids[i]) != expiry || seqs[i] != fmt.Sprint(expiry, false) || expiry <= 0 {
			t.Errorf("the expiry's ids %v and seqs %v on the streams; want one seq, the same everywhere", ids, seqs)
			break
		}
	}
	for _, url := range d.urls {
		if r := do(t, "GET", url+"/ttl/k", ""); r.code != 404 {
			t.Errorf("GET /ttl/k on %s after its expiry: %d %s; want 404", url, r.code, r.body)
		}
		if r := do(t, "GET", url+"/ttl/p", ""); r.code != 200 || r.body != `"p2"` || r.header.Get("X-TTL") != "" {
			t.Errorf("GET /ttl/p on %s: %d %s, X-TTL %q; want \"p2\", no TTL", url, r.code, r.body, r.header.Get("X-TTL"))
		}
	}
	if r := mustDo(t, 200, "POST", d.url()+"/ttl/k", `2`); xRevision(r) != 0 {
		t.Errorf("POST /ttl/k after its expiry: revision %d; want 0", xRevision(r))
	}
	if ids, _ := w.expect("/ttl/k:0=2", "/ttl/k:0=2"); seqOf(ids[0]) <= expiry {
		t.Errorf("the write after the expiry at %d: %v", expiry, ids)
	}
}

// testEvents: every server's streams, SSE and WebSocket, bring the same
// changes with the same seqs, wherever they were written: sets, a CAS, a
// delete, a transaction.
func testEvents(t *testing.T, start startFunc) {
	d := start(t)
	w := watchAll(t, d, "/ev/")
	var ids, seqs [][]string // of each change, of each stream
	for _, c := range []struct {
		method, path, body, rev string
		sse, ws                 []string
	}{
		{"POST", "/ev/a", `1`, "", []string{"/ev/a:0=1"}, []string{"/ev/a:0=1"}},
		{"POST", "/ev/b", `"x"`, "", []string{`/ev/b:0="x"`}, []string{`/ev/b:0="x"`}},
		{"PUT", "/ev/a", `{"n":2}`, "1", []string{`/ev/a:1={"n":2}`}, []string{`/ev/a:1={"n":2}`}},
		{"DELETE", "/ev/b", "", "", []string{"/ev/b:-1=null"}, []string{"/ev/b:-1 deleted"}},
		{"DELETE", "/ev/none", "", "", nil, nil}, // no change, no event
		{"POST", "/other", `0`, "", nil, nil},    // not watched
		{"POST", "/", `{"ops":[{"op":"delete","key":"/ev/a"},{"op":"set","key":"/ev/c","value":true}]}`, "",
			[]string{"/ev/a:-1=null", "/ev/c:0=true"}, []string{"/ev/a:-1 deleted", "/ev/c:0=true"}},
	} {
		var h []string
		if c.rev != "" {
			h = []string{"X-Revision", c.rev}
		}
		mustDo(t, 200, c.method, d.url()+c.path, c.body, h...)
		for i := range c.sse {
			id, seq := w.expect(c.sse[i], c.ws[i])
			ids, seqs = append(ids, id), append(seqs, seq)
		}
	}
	for k := range ids {
		for i := range d.urls {
			if ids[k][i] != ids[k][0] || seqs[k][i] != seqs[k][0] {
				t.Errorf("event %d: SSE ids %v, WebSocket seqs %v; want the same on every server", k, ids[k], seqs[k])
			}
		}
		if k > 0 && k < 4 && seqOf(ids[k][0]) <= seqOf(ids[k-1][0]) {
			t.Errorf("SSE seqs %s then %s; want them to increase", ids[k-1][0], ids[k][0])
		}
	}
	// The transaction's two events: the first carries the resume point
	// before it (no resume point inside a transaction), and says more.
	if seqOf(ids[4][0]) != seqOf(ids[3][0]) || seqOf(ids[5][0]) <= seqOf(ids[4][0]) ||
		seqs[4][0] != strings.Replace(seqs[3][0], "false", "true", 1) || !strings.HasSuffix(seqs[5][0], "false") {
		t.Errorf("the transaction's events: SSE %s then %s after %s, WebSocket %s then %s after %s; want the first at the point before",
			ids[4][0], ids[5][0], ids[3][0], seqs[4][0], seqs[5][0], seqs[3][0])
	}
}

// testResume: a stream started with its state on one server resumes on
// another (SSE Last-Event-ID, WebSocket since) with exactly the keys
// changed meanwhile, at their current state, then live; a resume point
// no server can know resets, then sends the whole state.
func testResume(t *testing.T, start startFunc) {
	d := start(t)
	mustDo(t, 200, "POST", d.url()+"/", `{"ops":[{"op":"set","key":"/rs/a","value":1},{"op":"set","key":"/rs/b","value":1},{"op":"set","key":"/rs/c","value":1}]}`)

	first, stop := openStream(t, d.node(0), "/rs/?initial")
	evs, _, synced := untilSynced(t, first)
	if got := strings.Join(evs, " "); got != "/rs/a:0=1 /rs/b:0=1 /rs/c:0=1" {
		t.Fatalf("initial state: %s", got)
	}
	stop()
	wsFirst := wsSubscribed(t, d.node(0), "/rs/", `,"initial":true`)
	m := wsNext(t, wsFirst)
	for ; m.Type != "synced"; m = wsNext(t, wsFirst) {
	}
	since := m.Payload.Seq

	mustDo(t, 200, "POST", d.url()+"/rs/b", `2`)
	mustDo(t, 200, "DELETE", d.url()+"/rs/c", "")
	mustDo(t, 200, "POST", d.url()+"/rs/d", `1`)
	mustDo(t, 200, "POST", d.url()+"/rs/b", `3`)

	want := "/rs/b:2=3 /rs/c:-1=null /rs/d:0=1 synced"
	var live []<-chan serverMsg
	for i := range d.urls {
		// Last-Event-ID wins over ?initial (an EventSource keeps its URL).
		for _, path := range []string{"/rs/", "/rs/?initial"} {
			ch, stop := openStream(t, d.node(i+1), path, "Last-Event-ID", synced.id)
			got := sseEvents(t, ch, 4)
			if s := strings.ReplaceAll(eventStrings(got), fmt.Sprintf("@%d", got[3].seq), ""); s != want {
				t.Errorf("SSE %s on %s from %s: %s; want %s", path, d.node(i+1), synced.id, s, want)
			}
			stop()
		}
		ws := wsSubscribed(t, d.node(i+1), "/rs/", fmt.Sprintf(`,"since":%d`, since))
		var got []serverMsg
		for range 4 {
			got = append(got, wsNext(t, ws))
		}
		if s := eventStrings(got); s != "/rs/b:2=3 /rs/c:-1 /rs/d:0=1 synced" {
			t.Errorf("WebSocket since %d on %s: %s", since, d.node(i+1), s)
		}
		live = append(live, ws)
	}
	mustDo(t, 200, "POST", d.url()+"/rs/e", `0`)
	for i, ws := range live {
		if m := wsNext(t, ws); m.String() != "/rs/e:0=0" {
			t.Errorf("WebSocket on %s, live after synced: %s; want /rs/e:0=0", d.node(i+1), m)
		}
	}

	// From a point no server knows: reset, then the whole state.
	for _, id := range []string{"x", "/rs/a:0:not-a-seq", fmt.Sprint(int64(1) << 52)} {
		ch, stop := openStream(t, d.url(), "/rs/", "Last-Event-ID", id)
		got := sseEvents(t, ch, 6)
		s := eventStrings(got)
		s = s[:strings.LastIndexByte(s, '@')]
		want := fmt.Sprintf("reset@%d /rs/a:0=1 /rs/b:2=3 /rs/d:0=1 /rs/e:0=0 synced", got[0].seq)
		if s != want {
			t.Errorf("SSE from %q: %s; want %s", id, s, want)
		}
		stop()
	}
}

// testTxn: transactions (POST / {check, ops}, WebSocket txn): applied as
// one change; a failed check applies nothing and names the key; so does
// a bad op; a transaction that changes nothing takes no seq.
func testTxn(t *testing.T, start startFunc) {
	d := start(t)
	r := mustDo(t, 200, "POST", d.url()+"/", `{"ops":[{"op":"set","key":"/tx/a","value":1},{"op":"set","key":"/tx/b","value":2,"ttl":"1h"}]}`)
	var done struct {
		Seq       int64
		Revisions map[string]int64
	}
	if err := json.Unmarshal([]byte(r.body), &done); err != nil || done.Seq <= 0 || done.Revisions["/tx/a"] != 0 || done.Revisions["/tx/b"] != 0 {
		t.Fatalf("first transaction: %s; want seq and revisions 0", r.body)
	}
	first := done.Seq
	r = mustDo(t, 200, "POST", d.url()+"/", `{"check":[{"key":"/tx/a","revision":0},{"key":"/tx/z","revision":-1}],"ops":[{"op":"set","key":"/tx/a","value":10},{"op":"delete","key":"/tx/b"}]}`)
	if err := json.Unmarshal([]byte(r.body), &done); err != nil || done.Seq <= first || done.Revisions["/tx/a"] != 1 || done.Revisions["/tx/b"] != -1 {
		t.Fatalf("second transaction: %s; want a later seq, /tx/a at 1, /tx/b deleted", r.body)
	}
	second := done.Seq

	// Refused, each: nothing applied.
	for _, tc := range []struct {
		body, want string
		code       int
	}{
		{`{"check":[{"key":"/tx/a","revision":0},{"key":"/tx/b","revision":-1}],"ops":[{"op":"set","key":"/tx/c","value":1}]}`,
			`"conflicts":[{"key":"/tx/a","value":10,"revision":1}]`, 409},
		{`{"check":[{"key":"/tx/b","revision":0}],"ops":[{"op":"set","key":"/tx/c","value":1}]}`,
			`"conflicts":[{"key":"/tx/b","value":null,"revision":-1}]`, 409},
		{`{"ops":[{"op":"set","key":"/tx/c","value":1},{"op":"bogus","key":"/tx/d"}]}`, `bogus`, 400},
		{`{"ops":[{"op":"set","key":"/tx/c","value":1},{"op":"set","key":"/tx/c","value":2}]}`, `/tx/c`, 400},
		{`{"ops":[{"op":"set","key":"/tx/c","value":1},{"op":"set","key":"/tx//d","value":2}]}`, `/tx//d`, 400},
		{`{"ops":[{"op":"set","key":"/tx/c","value":1},{"op":"set","key":"/tx/d","value":2,"ttl":"0"}]}`, `TTL`, 400},
		{`{"ops":[{"op":"set","key":"/tx/c","value":1},{"op":"set","key":"/tx/d"}]}`, `value`, 400},
		{`{"ops":[]}`, `ops`, 400},
	} {
		r := do(t, "POST", d.url()+"/", tc.body)
		if r.code != tc.code || !strings.Contains(r.body, tc.want) {
			t.Errorf("POST / %s: got %d %s; want %d with %s", tc.body, r.code, r.body, tc.code, tc.want)
		}
	}
	for _, url := range d.urls {
		var items []struct {
			Key      string
			Value    json.RawMessage
			Revision int64
		}
		r := mustDo(t, 200, "GET", url+"/tx/", "")
		if err := json.Unmarshal([]byte(r.body), &items); err != nil || len(items) != 1 || items[0].Key != "/tx/a" || string(items[0].Value) != "10" {
			t.Errorf("/tx/ on %s after the refused transactions: %s; want /tx/a = 10 alone", url, r.body)
		}
		if seq, _ := strconv.ParseInt(r.header.Get("X-Seq"), 10, 64); seq < second {
			t.Errorf("/tx/ on %s: X-Seq %d; want at least %d", url, seq, second)
		}
	}

	// Nothing changed, no seq taken: the answer carries the current one.
	r = mustDo(t, 200, "POST", d.url()+"/", `{"ops":[{"op":"delete","key":"/tx/none"}]}`)
	if err := json.Unmarshal([]byte(r.body), &done); err != nil || done.Seq < second || done.Revisions["/tx/none"] != -1 {
		t.Errorf("a transaction that changes nothing: %s; want the current seq (at least %d)", r.body, second)
	}

	// Over the WebSocket, keys as the client spells them.
	ws := wsOpen(t, d.url(),
		`{"type":"txn","id":1,"payload":{"check":[{"key":"tx/a","revision":1}],"ops":[{"op":"set","key":"tx/a","value":11},{"op":"set","key":"/tx/w","value":0}]}}`,
		`{"type":"txn","id":2,"payload":{"check":[{"key":"tx/a","revision":1}],"ops":[{"op":"set","key":"tx/a","value":12}]}}`)
	if m := wsNext(t, ws); m.Type != "ok" || !strings.Contains(m.raw, `"revisions":{"tx/a":2,"/tx/w":0}`) {
		t.Errorf("WebSocket txn: %s; want ok with tx/a at 2", m.raw)
	}
	if m := wsNext(t, ws); m.raw != `{"type":"conflict","payload":{"conflicts":[{"key":"tx/a","value":11,"revision":2}]},"id":2}` {
		t.Errorf("WebSocket txn with a stale check: %s; want the conflict", m.raw)
	}
}

// testBank: accounts that transactions move money between, on any
// server; every listing and every stream, at every resume point, holds
// the same total.
func testBank(t *testing.T, start startFunc) {
	d := start(t)
	const accounts, each, workers, transfers = 5, 100, 3, 15
	var ops []string
	for i := range accounts {
		ops = append(ops, fmt.Sprintf(`{"op":"set","key":"/bank/%d","value":%d}`, i, each))
	}
	mustDo(t, 200, "POST", d.url()+"/", `{"ops":[`+strings.Join(ops, ",")+`]}`)
	const total = accounts * each

	stop := make(chan struct{})
	var watchers sync.WaitGroup
	errs := make(chan error, 100)
	report := func(err error) {
		select {
		case errs <- err:
		default:
		}
	}
	sum := func(balances map[string]int) int {
		n := 0
		for _, b := range balances {
			n += b
		}
		return n
	}
	for i := range d.urls {
		// An SSE stream and a WebSocket subscription of every server,
		// with the state first: the total at every resume point (a
		// transaction's last event, or synced).
		sse := subscribe(t, d.node(i), "/bank/?initial")
		ws := wsSubscribed(t, d.node(i), "/bank/", `,"initial":true`)
		watchers.Add(2)
		go func() {
			defer watchers.Done()
			balances, synced, last := map[string]int{}, false, int64(-1)
			for {
				select {
				case <-stop:
					return
				case ev, ok := <-sse:
					if !ok {
						report(fmt.Errorf("the SSE stream of %s ended", d.node(i)))
						return
					}
					if ev.name == "" {
						n, _ := strconv.Atoi(ev.data)
						balances[ev.key] = n
					}
					if ev.name == "synced" || synced && ev.name == "" && ev.seq != last {
						if n := sum(balances); n != total {
							report(fmt.Errorf("SSE on %s at %s: total %d (%v); want %d", d.node(i), ev.id, n, balances, total))
						}
					}
					synced = synced || ev.name == "synced"
					last = ev.seq
				}
			}
		}()
		go func() {
			defer watchers.Done()
			balances, synced := map[string]int{}, false
			for {
				select {
				case <-stop:
					return
				case m, ok := <-ws:
					if !ok {
						report(fmt.Errorf("the WebSocket of %s ended", d.node(i)))
						return
					}
					if m.Type == "value" {
						n, _ := strconv.Atoi(string(m.Payload.Value))
						balances[m.Payload.Key] = n
					}
					if m.Type == "synced" || synced && m.Type == "value" && !m.Payload.More {
						if n := sum(balances); n != total {
							report(fmt.Errorf("WebSocket on %s at seq %d: total %d (%v); want %d", d.node(i), m.Payload.Seq, n, balances, total))
						}
					}
					synced = synced || m.Type == "synced"
				}
			}
		}()
	}
	// A lister on any server.
	watchers.Add(1)
	go func() {
		defer watchers.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			r, err := call("GET", d.url()+"/bank/", "")
			if err != nil {
				report(err)
				return
			}
			var items []struct{ Value int }
			json.Unmarshal([]byte(r.body), &items)
			n := 0
			for _, it := range items {
				n += it.Value
			}
			if r.code != 200 || n != total || len(items) != accounts {
				report(fmt.Errorf("listing: %d %s; want %d accounts holding %d", r.code, r.body, accounts, total))
			}
		}
	}()

	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range transfers {
				if err := bankTransfer(d, w); err != nil {
					report(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	watchers.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for _, url := range d.urls {
		var items []struct{ Value int }
		json.Unmarshal([]byte(mustDo(t, 200, "GET", url+"/bank/", "").body), &items)
		n := 0
		for _, it := range items {
			n += it.Value
		}
		if n != total {
			t.Errorf("the end, on %s: total %d; want %d", url, n, total)
		}
	}
}

// bankTransfer moves money between two accounts at random, reading each and
// committing with a check of both revisions, again on a conflict.
func bankTransfer(d *deployment, worker int) error {
	from := rand.IntN(5)
	to := (from + 1 + rand.IntN(4)) % 5
	for {
		var bal [2]int
		var rev [2]int64
		for i, acct := range []int{from, to} {
			r, err := call("GET", fmt.Sprintf("%s/bank/%d", d.url(), acct), "")
			if err != nil {
				return err
			}
			if r.code != 200 {
				return fmt.Errorf("worker %d: GET /bank/%d: %d %s", worker, acct, r.code, r.body)
			}
			bal[i], _ = strconv.Atoi(r.body)
			rev[i] = xRevision(r)
		}
		amount := min(bal[0], 1+rand.IntN(20))
		body := fmt.Sprintf(`{"check":[{"key":"/bank/%d","revision":%d},{"key":"/bank/%d","revision":%d}],`+
			`"ops":[{"op":"set","key":"/bank/%d","value":%d},{"op":"set","key":"/bank/%d","value":%d}]}`,
			from, rev[0], to, rev[1], from, bal[0]-amount, to, bal[1]+amount)
		r, err := call("POST", d.url()+"/", body)
		switch {
		case err != nil:
			return err
		case r.code == 200:
			return nil
		case r.code != 409:
			return fmt.Errorf("worker %d: transfer: %d %s", worker, r.code, r.body)
		}
	}
}
