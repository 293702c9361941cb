package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// sseEvent is one event of a stream, as EventSource dispatches it.
type sseEvent struct {
	name string // "" for a message; "synced", "reset"
	key  string // of a message
	rev  int64
	data string
	id   string // the stream's last event id when it came
	seq  int64  // the id's last field
}

// String gives a message as key:revision=data, or a named event as
// name@seq.
func (ev sseEvent) String() string {
	if ev.name != "" {
		return fmt.Sprintf("%s@%d", ev.name, ev.seq)
	}
	return fmt.Sprintf("%s:%d=%s", ev.key, ev.rev, ev.data)
}

// subscribe opens an event stream of path (which may carry a query) and
// returns its events as they arrive; the channel closes with the stream.
func subscribe(t testing.TB, url, path string, headers ...string) <-chan sseEvent {
	t.Helper()
	ch, _ := openStream(t, url, path, headers...)
	return ch
}

// openStream is subscribe with a function that closes the stream.
func openStream(t testing.TB, url, path string, headers ...string) (<-chan sseEvent, func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", url+path, nil)
	req.Header.Set("Accept", "text/event-stream")
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		cancel()
		t.Fatalf("subscribe %s: %v", path, err)
	}
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		b, _ := io.ReadAll(resp.Body)
		cancel()
		t.Fatalf("subscribe %s: got %d %s %s", path, resp.StatusCode, resp.Header.Get("Content-Type"), b)
	}
	ch := make(chan sseEvent, 1024)
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer close(ch)
		defer resp.Body.Close()
		readEvents(t, bufio.NewReader(resp.Body), "", func(ev sseEvent) bool {
			select {
			case ch <- ev:
				return true
			case <-ctx.Done():
				return false
			}
		})
	}()
	stop := func() { cancel(); <-done }
	t.Cleanup(stop)
	return ch, stop
}

// readEvents parses an event stream as EventSource does, and calls f with
// each event it dispatches until f returns false or the stream ends. It
// returns the last event id, as EventSource would send it on
// reconnecting, starting from lastID, the one it had before: an id takes
// effect when its block ends, even a block without data (which
// dispatches nothing); a line cut short by the end of the stream counts
// for nothing. Each stream's id buffer starts empty, as the spec has it
// (Chromium starts it at the last id), so an event without an id would
// clear the last id: the strictest client.
func readEvents(t testing.TB, r *bufio.Reader, lastID string, f func(sseEvent) bool) string {
	var ev sseEvent
	var idBuf string
	hasData := false
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return lastID // an unfinished line or block is dropped
		}
		line = strings.TrimSuffix(line, "\n")
		switch {
		case strings.HasPrefix(line, "id: "):
			idBuf = line[4:]
		case strings.HasPrefix(line, "event: "):
			ev.name = line[7:]
		case strings.HasPrefix(line, "data: "):
			ev.data, hasData = line[6:], true
		case line == "":
			lastID = idBuf
			if hasData {
				ev.id = lastID
				if ev.name == "" {
					ev.key, ev.rev, ev.seq = parseID(t, lastID)
				} else {
					ev.seq = seqOf(lastID)
				}
				if !f(ev) {
					return lastID
				}
			}
			ev, hasData = sseEvent{}, false
		}
	}
}

// parseID reads a change's event id, <key>:<revision>:<seq>, whose key has
// "%" and ":" written "%25" and "%3A".
func parseID(t testing.TB, id string) (key string, rev, seq int64) {
	fields := strings.Split(id, ":")
	if len(fields) != 3 {
		t.Errorf("id %q: want <key>:<revision>:<seq>, with no other colon", id)
		return "", 0, 0
	}
	rev, err := strconv.ParseInt(fields[1], 10, 64)
	seq, err2 := strconv.ParseInt(fields[2], 10, 64)
	if err != nil || err2 != nil {
		t.Errorf("id %q: bad revision or seq", id)
	}
	return strings.NewReplacer("%3A", ":", "%25", "%").Replace(fields[0]), rev, seq
}

// seqOf returns the last field of an id, or -1.
func seqOf(id string) int64 {
	seq, err := strconv.ParseInt(id[strings.LastIndexByte(id, ':')+1:], 10, 64)
	if err != nil {
		return -1
	}
	return seq
}

// next returns the next message, skipping named events (synced, reset),
// as EventSource.onmessage would, failing the test if none comes.
func next(t testing.TB, ch <-chan sseEvent) sseEvent {
	t.Helper()
	for {
		if ev := nextEvent(t, ch); ev.name == "" {
			return ev
		}
	}
}

// nextEvent returns the next event, named or not, failing the test if
// none comes.
func nextEvent(t testing.TB, ch <-chan sseEvent) sseEvent {
	t.Helper()
	select {
	case ev, ok := <-ch:
		if !ok {
			t.Fatal("stream closed")
		}
		return ev
	case <-time.After(10 * time.Second):
		t.Fatal("no event")
	}
	return sseEvent{}
}

// TestSubscriptionMatching checks who sees what: a table of watched paths
// against writes, through the registry itself.
func TestSubscriptionMatching(t *testing.T) {
	s := NewStore(0, nil)
	watchers := map[string][]string{
		"/a/b":   {"/a/b"},
		"/a/":    {"/a/b", "/a/c", "/a/b/c"},
		"/a/b/":  {"/a/b/c"},
		"/ab/":   {"/ab/x"},
		"/":      {"/a/b", "/a/c", "/ab", "/a/b/c", "/ab/x", "/x"},
		"/x":     {"/x"},
		"/nope/": nil,
	}
	subs := map[string]*subscription{}
	for path := range watchers {
		subs[path] = &subscription{path: path, q: &coalescer{}}
		s.Subscribe(subs[path], fromNow, nil)
	}
	for _, key := range []string{"/a/b", "/a/c", "/ab", "/a/b/c", "/ab/x", "/x"} {
		s.Set(key, "1", 0)
	}
	for path, want := range watchers {
		var got []string
		batch, _ := subs[path].q.drain()
		for _, ev := range batch {
			got = append(got, ev.key)
		}
		slices.Sort(got)
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Errorf("watching %s: got %v; want %v", path, got, want)
		}
	}
	for _, sub := range subs {
		s.Unsubscribe(sub)
	}
	if n := s.subs.count.Load(); n != 0 || len(s.subs.paths) != 0 {
		t.Errorf("after unsubscribing all: %d registrations, %d paths; want 0", n, len(s.subs.paths))
	}
}

func TestCoalescer(t *testing.T) {
	q := &coalescer{}
	change := func(key string, rev int64) event {
		if rev < 0 {
			return event{kind: evChange, key: key, why: deleted}
		}
		return event{kind: evChange, key: key, e: &entry{value: "1", revision: rev}}
	}
	pending := func() (got []string) {
		batch, _ := q.drain()
		for _, ev := range batch {
			switch {
			case ev.kind == evGone:
			case ev.reply != nil:
				got = append(got, string(ev.reply.append(nil)))
			case ev.e == nil:
				got = append(got, ev.key+":-1")
			default:
				got = append(got, fmt.Sprintf("%s:%d", ev.key, ev.e.revision))
			}
		}
		q.recycle(batch)
		return got
	}
	q.push(change("/a", 0))
	q.push(change("/b", 0))
	q.push(change("/a", 1))
	q.push(change("/a", -1))
	q.push(event{kind: evReply, reply: &wsReply{head: []byte("reply")}})
	q.push(event{kind: evReply, reply: &wsReply{head: []byte("reply")}})
	if got, want := pending(), []string{"/b:0", "/a:-1", "reply", "reply"}; !slices.Equal(got, want) {
		t.Errorf("batch: got %v; want %v (one event per key, the latest, in the order of the latest changes; replies all kept)", got, want)
	}

	// A reply is a barrier: a newer event of a key pending before it goes
	// after it, and the older stays.
	q.push(change("/a", 0))
	q.push(event{kind: evReply, reply: &wsReply{head: []byte("ok 0")}})
	q.push(change("/b", 0))
	q.push(change("/a", 1))
	q.push(change("/b", 1))
	q.push(change("/a", 2))
	if got, want := pending(), []string{"/a:0", "ok 0", "/b:1", "/a:2"}; !slices.Equal(got, want) {
		t.Errorf("batch with a reply: got %v; want %v (no event moved behind a reply queued after it)", got, want)
	}

	// Many changes of a few keys: the gaps they leave are squeezed out,
	// and the order stays that of each key's latest change.
	for i := range 1000 {
		q.push(change(fmt.Sprintf("/k%d", i%7), int64(i)))
		if n := len(q.pending); n > 2*7+17 {
			t.Fatalf("after %d changes of 7 keys, %d events pending, gaps included", i+1, n)
		}
	}
	if got, want := pending(), []string{"/k6:993", "/k0:994", "/k1:995", "/k2:996", "/k3:997", "/k4:998", "/k5:999"}; !slices.Equal(got, want) {
		t.Errorf("after squeezing: got %v; want %v", got, want)
	}

	// Warm: pushing and draining again allocates nothing.
	allocs := testing.AllocsPerRun(100, func() {
		q.push(event{kind: evChange, key: "/a", e: e0})
		q.push(event{kind: evChange, key: "/b", e: e0})
		q.push(event{kind: evChange, key: "/a", e: e0})
		batch, _ := q.drain()
		q.recycle(batch)
	})
	if allocs != 0 {
		t.Errorf("warm push/drain: %v allocations; want 0", allocs)
	}
}

var e0 = &entry{value: "1"}

// TestSSE checks the stream's headers and wire format end to end,
// including deletes and expiries as null/-1 and heartbeats.
func TestSSE(t *testing.T) {
	url := startServer(t, "-heartbeat", "20ms")
	req, _ := http.NewRequest("GET", url+"/a/", nil)
	req.Header.Set("Accept", "text/html;q=0.5, text/event-stream")
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	for h, want := range map[string]string{
		"Content-Type":                "text/event-stream",
		"Cache-Control":               "no-cache",
		"X-Accel-Buffering":           "no",
		"Access-Control-Allow-Origin": "*",
	} {
		if got := resp.Header.Get(h); got != want {
			t.Errorf("%s: got %q; want %q", h, got, want)
		}
	}
	guard := time.AfterFunc(20*time.Second, func() { resp.Body.Close() }) // a hang breaker
	defer guard.Stop()
	r := bufio.NewReader(resp.Body)
	var seen string
	// readUntil reads until the stream holds pattern, consumes up to its
	// end, and returns its first group as a number.
	readUntil := func(pattern string) int64 {
		t.Helper()
		re := regexp.MustCompile(pattern)
		for {
			if m := re.FindStringSubmatchIndex(seen); m != nil {
				var n int64
				if len(m) > 2 {
					n, _ = strconv.ParseInt(seen[m[2]:m[3]], 10, 64)
				}
				seen = seen[m[1]:]
				return n
			}
			line, err := r.ReadString('\n')
			if err != nil {
				t.Fatalf("reading for %q: %v; got %q", pattern, err, seen)
			}
			seen += line
		}
	}
	// The stream's position, before any change: its first resume point.
	start := readUntil(`^retry: 2000\nid: (\d+)\n\n`)
	do(t, "POST", url+"/a/k", `{"x": [1, 2]}`)
	seq := readUntil(`id: /a/k:0:(\d+)\ndata: \{"x":\[1,2\]\}\n\n`)
	if seq != start+1 {
		t.Errorf("first change: seq %d; want %d, the one after the stream's start", seq, start+1)
	}
	readUntil(`:\n`) // a heartbeat
	do(t, "DELETE", url+"/a/k", "")
	if got := readUntil(`id: /a/k:-1:(\d+)\ndata: null\n\n`); got != seq+1 {
		t.Errorf("delete: seq %d; want %d", got, seq+1)
	}
	do(t, "POST", url+"/b", `1`) // not watched: it takes a number all the same
	do(t, "POST", url+"/a/t?ttl=30ms", `7`)
	if got := readUntil(`id: /a/t:0:(\d+)\ndata: 7\n\n`); got != seq+3 {
		t.Errorf("after a change elsewhere: seq %d; want %d", got, seq+3)
	}
	readUntil(`id: /a/t:-1:(\d+)\ndata: null\n\n`) // expired
	// An idle stream's heartbeat carries the position it has reached.
	do(t, "POST", url+"/b", `2`)
	for pos := int64(0); pos < seq+5; {
		pos = readUntil(`:\nid: (\d+)\n\n`)
	}
}

func TestSSEInitial(t *testing.T) {
	url := startServer(t)
	do(t, "POST", url+"/p/a", `1`)
	do(t, "POST", url+"/p/a", `2`)
	do(t, "POST", url+"/p/c", `3`)
	do(t, "POST", url+"/p/b", `4`)
	do(t, "POST", url+"/other", `5`)

	t.Run("key", func(t *testing.T) {
		ch := subscribe(t, url, "/p/a?initial")
		if ev := next(t, ch); ev.String() != "/p/a:1=2" {
			t.Errorf("initial: got %v; want /p/a rev 1 = 2", ev)
		}
		do(t, "POST", url+"/p/a", `3`)
		if ev := next(t, ch); ev.String() != "/p/a:2=3" {
			t.Errorf("live: got %v; want /p/a rev 2", ev)
		}
	})
	t.Run("missing key", func(t *testing.T) {
		ch := subscribe(t, url, "/p/none?initial=1")
		if ev := next(t, ch); ev.String() != "/p/none:-1=null" {
			t.Errorf("initial: got %v; want null/-1", ev)
		}
	})
	t.Run("prefix", func(t *testing.T) {
		ch := subscribe(t, url, "/p/?initial")
		var got []string
		for range 3 {
			ev := next(t, ch)
			got = append(got, fmt.Sprintf("%s:%d=%s", ev.key, ev.rev, ev.data))
		}
		slices.Sort(got) // a state comes in the store's order, not the keys'
		if want := []string{"/p/a:2=3", "/p/b:0=4", "/p/c:0=3"}; !slices.Equal(got, want) {
			t.Errorf("initial: got %v; want %v", got, want)
		}
		do(t, "POST", url+"/p/d", `6`)
		if ev := next(t, ch); ev.key != "/p/d" {
			t.Errorf("live: got %v; want /p/d", ev)
		}
	})
	t.Run("Last-Event-ID resumes with the current state", func(t *testing.T) {
		ch := subscribe(t, url, "/p/a")
		do(t, "POST", url+"/p/a", `10`)
		last := next(t, ch)
		// The stream drops; writes happen meanwhile; EventSource reconnects
		// with the last id it saw.
		do(t, "POST", url+"/p/a", `11`)
		do(t, "POST", url+"/p/a", `12`)
		ch = subscribe(t, url, "/p/a", "Last-Event-ID", fmt.Sprintf("%s:%d", last.key, last.rev))
		if ev := next(t, ch); ev.String() != fmt.Sprintf("/p/a:%d=12", last.rev+2) {
			t.Errorf("after resume: got %v; want the current state, rev %d = 12", ev, last.rev+2)
		}
	})
	t.Run("bad path", func(t *testing.T) {
		resp := do(t, "GET", url+"/a/%FF/", "", "Accept", "text/event-stream")
		if resp.code != 400 || !strings.Contains(errorMessage(resp), `invalid path "/a/\xff/": not valid UTF-8`) {
			t.Errorf("got %d %s; want 400", resp.code, resp.body)
		}
	})
}

// TestSSEOrderAndFinalState: 8 writers hammer 50 keys over HTTP while 20
// subscribers watch "/". Every subscriber's revisions of each key must
// strictly increase, and every subscriber must end holding the final
// revision of every key.
func TestSSEOrderAndFinalState(t *testing.T) {
	url := startServer(t)
	const keys, writers, writes, subscribers = 50, 8, 150, 20
	var streams []<-chan sseEvent
	for range subscribers {
		streams = append(streams, subscribe(t, url, "/"))
	}
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range writes {
				key := fmt.Sprintf("/k/%d", (i*7+w)%keys)
				if resp := do(t, "POST", url+key, strconv.Itoa(i)); resp.code != 200 {
					t.Errorf("POST: %d", resp.code)
				}
			}
		}()
	}
	wg.Wait()
	final := map[string]int64{}
	for _, it := range listAll(t, url) {
		final[it.Key] = it.Revision
	}
	if len(final) != keys {
		t.Fatalf("%d keys; want %d", len(final), keys)
	}
	for i, ch := range streams {
		last := map[string]int64{}
		for !sameRevisions(last, final) {
			ev := next(t, ch)
			if prev, ok := last[ev.key]; ok && ev.rev <= prev {
				t.Fatalf("subscriber %d: %s went from revision %d to %d", i, ev.key, prev, ev.rev)
			}
			last[ev.key] = ev.rev
		}
	}
}

// TestSSEFinalStateAfterEveryBurst: a change that comes while its stream is
// being written is sent right after, not left until some later change. A
// subscriber of "/" must hold the last revision of every key at the end of
// each of many bursts of concurrent writes; nothing comes after to rescue a
// change left behind.
func TestSSEFinalStateAfterEveryBurst(t *testing.T) {
	url := startServer(t)
	events := subscribe(t, url, "/")
	const keys = 4
	last := map[string]int64{}
	for round := range 100 {
		var wg sync.WaitGroup
		want := map[string]int64{}
		for k := range keys {
			key := fmt.Sprintf("/b/%d", k)
			want[key] = int64(round)
			wg.Add(1)
			go func() {
				defer wg.Done()
				do(t, "POST", url+key, strconv.Itoa(round))
			}()
		}
		wg.Wait()
		for !sameRevisions(last, want) {
			ev := next(t, events)
			last[ev.key] = ev.rev
		}
	}
}

func sameRevisions(a, b map[string]int64) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range b {
		if a[k] != v {
			return false
		}
	}
	return true
}

type listed struct {
	Key      string
	Revision int64
}

func listAll(t testing.TB, url string) []listed {
	t.Helper()
	var items []listed
	if err := jsonUnmarshal(do(t, "GET", url+"/", "", "Accept", "application/json").body, &items); err != nil {
		t.Fatal(err)
	}
	return items
}

// newTestServer serves cfg's server with httptest, so a test can look
// inside it. It closes the server's streams when the test ends.
func newTestServer(t *testing.T, args ...string) (*server, string) {
	t.Helper()
	srv, hs, stop := serveTestServer(t, args)
	t.Cleanup(stop)
	return srv, hs.URL
}

// serveTestServer serves cfg's server with httptest, its data loaded
// first as run does, and returns stop, which closes the server, its
// streams and its data.
func serveTestServer(t *testing.T, args []string) (*server, *httptest.Server, func()) {
	t.Helper()
	cfg, err := parseConfig(args, func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := newServer(cfg, discardLogger())
	if err != nil {
		t.Fatal(err)
	}
	var data *dataDir
	if cfg.data != "" { // as run does
		if data, err = openData(cfg.data, cfg.fsync, srv.store, discardLogger()); err != nil {
			t.Fatal(err)
		}
	}
	hs := httptest.NewServer(srv.routes())
	return srv, hs, func() {
		hs.Close()
		srv.close()
		if data != nil {
			srv.store.expiry.stop()
			data.close()
		}
	}
}

// waitFor polls cond until it holds; it fails the test after a long
// guard, which is not a timing assertion but a hang breaker.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// TestStalledSubscriber: a subscriber that never reads does not slow
// writers, holds at most one pending event per key, and is closed after
// the write timeout.
func TestStalledSubscriber(t *testing.T) {
	srv, url := newTestServer(t, "-write-timeout", "300ms")
	conn, err := net.Dial("tcp", strings.TrimPrefix(url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.(*net.TCPConn).SetReadBuffer(4096)
	fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
	stallUntilClosed(t, srv, url)
}

// stallUntilClosed waits for the one subscriber of "/" (whose client never
// reads), then writes large values to 20 keys until the server closes it.
// Every write must succeed, and the subscriber's queue must never hold more
// than one event per key.
func stallUntilClosed(t *testing.T, srv *server, url string) {
	t.Helper()
	waitFor(t, "the subscription", func() bool { return srv.store.subs.count.Load() == 1 })
	var q *coalescer
	srv.store.seqMu.Lock()
	for sub := range srv.store.subs.paths["/"] {
		q = sub.q
	}
	srv.store.seqMu.Unlock()

	const keys = 20
	big := `"` + strings.Repeat("x", 256<<10) + `"`
	maxPending, writes := 0, 0
	for i := 0; srv.streams.Len() > 0; i++ {
		writes++
		if resp := do(t, "POST", fmt.Sprintf("%s/k/%d", url, i%keys), big); resp.code != 200 {
			t.Fatalf("write %d while a subscriber stalls: %d", i, resp.code)
		}
		maxPending = max(maxPending, q.Len())
		if i > 5000 { // about 1.3 GB written: far past any socket buffer
			t.Fatal("the stalled subscriber was never closed")
		}
	}
	t.Logf("the stalled subscriber was closed after %d writes", writes)
	if maxPending > keys {
		t.Errorf("pending events reached %d; want at most %d, one per key", maxPending, keys)
	}
	waitFor(t, "the subscription to go", func() bool { return srv.store.subs.count.Load() == 0 })
}

// TestSlowClientGetsTheRest: a batch larger than the socket buffers cannot
// be written without blocking; the rest follows once the client reads,
// whole and in order, and so do the events queued meanwhile.
func TestSlowClientGetsTheRest(t *testing.T) {
	srv, url := newTestServer(t, "-max-value-bytes", "20000000")
	// The client reads nothing until both writes are done, but its receive
	// buffer keeps its normal size, so that it then reads at full speed.
	conn := dialStalled(t, url, "/", 0)
	waitFor(t, "the subscription", func() bool { return srv.store.subs.count.Load() == 1 })
	big := `"` + strings.Repeat("x", 16_000_000) + `"` // past the socket buffers (4 MB at most by default)
	do(t, "POST", url+"/big", big)
	do(t, "POST", url+"/after", `1`)
	waitFor(t, "a write too big for the socket buffers", func() bool { return srv.writers.slow.Load() > 0 })

	conn.SetReadDeadline(time.Now().Add(20 * time.Second)) // a hang breaker
	r := bufio.NewReader(conn)
	var got []string
	for len(got) < 4 {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("after %d lines: %v", len(got), err)
		}
		if strings.HasPrefix(line, "id: /") || strings.HasPrefix(line, "data:") { // not the stream's position mark
			got = append(got, strings.TrimSuffix(line, "\n"))
		}
	}
	want := []string{"id: /big:0:", "data: " + big, "id: /after:0:", "data: 1"}
	for i := range want {
		if got[i] != want[i] && !(strings.HasPrefix(want[i], "id:") && strings.HasPrefix(got[i], want[i])) {
			t.Fatalf("line %d: got %.40q… (%d bytes); want %.40q… (%d bytes)", i, got[i], len(got[i]), want[i], len(want[i]))
		}
	}
}

// TestStalledSubscriberHoldsUpNoOne: while one subscriber's client reads
// nothing and a write to it waits, another subscriber still gets every
// change, before the stalled one is closed.
func TestStalledSubscriberHoldsUpNoOne(t *testing.T) {
	srv, url := newTestServer(t, "-max-value-bytes", "20000000", "-write-timeout", "10m")
	dialStalled(t, url, "/", 4096)
	waitFor(t, "the stalled subscription", func() bool { return srv.store.subs.count.Load() == 1 })
	events := subscribe(t, url, "/")
	waitFor(t, "both subscriptions", func() bool { return srv.store.subs.count.Load() == 2 })

	do(t, "POST", url+"/big", `"`+strings.Repeat("x", 16_000_000)+`"`) // fills the stalled one's buffers
	waitFor(t, "a write too big for the socket buffers", func() bool { return srv.writers.slow.Load() > 0 })
	for i := range 20 {
		do(t, "POST", url+"/small", strconv.Itoa(i))
	}
	guard := time.After(20 * time.Second) // a hang breaker, not a timing
	for done := false; !done; {
		select {
		case ev := <-events:
			done = ev.key == "/small" && ev.rev == 19
		case <-guard:
			t.Fatal("the last change never came while the other subscriber stalled")
		}
	}
	if n := srv.streams.Len(); n != 2 {
		t.Errorf("open streams: got %d; want 2, the stalled one still open", n)
	}
}

// dialStalled opens an event stream of path whose client reads nothing,
// with a receive buffer of rcvbuf bytes (0: the system's).
func dialStalled(t *testing.T, url, path string, rcvbuf int) net.Conn {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if rcvbuf > 0 {
		conn.(*net.TCPConn).SetReadBuffer(rcvbuf)
	}
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n", path)
	return conn
}

// TestMaxSubscribers: event streams and WebSockets share one count, and
// one admission: whichever kind fills -max-subscribers, the next of
// either kind gets the same 503.
func TestMaxSubscribers(t *testing.T) {
	const refused = "too many subscribers (-max-subscribers): try again later"
	upgrade := []string{"Upgrade", "websocket", "Connection", "Upgrade", "Sec-WebSocket-Version", "13", "Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="}
	for _, tt := range []struct {
		name string
		open func(t *testing.T, url string)
	}{
		{"two event streams", func(t *testing.T, url string) { subscribe(t, url, "/a"); subscribe(t, url, "/") }},
		{"two WebSockets", func(t *testing.T, url string) { dialWS(t, url, ""); dialWS(t, url, "") }},
		{"one of each", func(t *testing.T, url string) { subscribe(t, url, "/a"); dialWS(t, url, "") }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			url := startServer(t, "-max-subscribers", "2")
			tt.open(t, url)
			if resp := do(t, "GET", url+"/b", "", "Accept", "text/event-stream"); resp.code != 503 || errorMessage(resp) != refused {
				t.Errorf("a third, an event stream: got %d %s; want 503 %q", resp.code, resp.body, refused)
			}
			if resp := do(t, "GET", url+"/", "", upgrade...); resp.code != 503 || errorMessage(resp) != refused {
				t.Errorf("a third, a WebSocket: got %d %s; want 503 %q", resp.code, resp.body, refused)
			}
			if resp := do(t, "GET", url+"/b", ""); resp.code != 404 {
				t.Errorf("plain GET while full: got %d; want 404", resp.code)
			}
		})
	}
}

// TestShutdownClosesStreams: with 100 open streams, stopping the server
// returns promptly and leaves no goroutine behind.
func TestShutdownClosesStreams(t *testing.T) {
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()
	before := runtime.NumGoroutine()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"-addr", "127.0.0.1:0"}, func(string) string { return "" }, pw)
		pw.Close()
	}()
	sc := bufio.NewScanner(pr)
	sc.Scan()
	go io.Copy(io.Discard, pr)
	url := "http://" + strings.Fields(strings.SplitN(sc.Text(), "addr=", 2)[1])[0]

	var bodies []io.ReadCloser
	for i := range 100 {
		req, _ := http.NewRequest("GET", fmt.Sprintf("%s/s/%d", url, i), nil)
		req.Header.Set("Accept", "text/event-stream")
		resp, err := http.DefaultTransport.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		bodies = append(bodies, resp.Body)
	}
	start := time.Now()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("run: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("run did not return")
	}
	t.Logf("shutdown with 100 streams took %v", time.Since(start))
	for _, b := range bodies {
		if _, err := io.Copy(io.Discard, b); err != nil {
			t.Errorf("stream did not end cleanly: %v", err)
		}
		b.Close()
	}
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()
	waitFor(t, "goroutines to end", func() bool { return runtime.NumGoroutine() <= before })
}

func BenchmarkPublish(b *testing.B) {
	for _, n := range []int{1, 100, 10000} {
		b.Run(fmt.Sprintf("subscribers=%d", n), func(b *testing.B) {
			s := NewStore(0, nil)
			for range n {
				s.Subscribe(&subscription{path: "/k", q: &coalescer{}}, fromNow, nil)
			}
			s.Set("/k", "1", 0) // warm every queue
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				s.Set("/k", `{"v":1}`, 0)
			}
		})
	}
	// Streams that are idle when the change comes: each is queued for a
	// writer, which here takes its batch and writes nothing.
	for _, n := range []int{1, 100, 10000} {
		b.Run(fmt.Sprintf("idle-streams=%d", n), func(b *testing.B) {
			s := NewStore(0, nil)
			w := &eventWriters{wake: make(chan struct{}, 1)}
			for range n {
				st := w.newStream(nil)
				sse := &sseStream{}
				sse.sub = subscription{path: "/k", q: &st.q}
				st.proto = sse
				s.Subscribe(&sse.sub, fromNow, nil)
				st.idle()
			}
			take := func() {
				for st := w.next(); st != nil; st = w.next() {
					batch, _ := st.q.drain()
					st.q.recycle(batch)
					st.idle()
				}
			}
			for range 2 { // warm every queue: a batch and its spare
				s.Set("/k", "1", 0)
				take()
			}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				s.Set("/k", `{"v":1}`, 0)
				take()
			}
		})
	}
}

func jsonUnmarshal(s string, v any) error { return json.Unmarshal([]byte(s), v) }
