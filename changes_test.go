package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// untilSynced reads a stream's events up to its synced, and returns the
// events before it, as strings sorted (a state comes in the store's
// order, not the keys'), their tags, and the synced.
func untilSynced(t *testing.T, ch <-chan sseEvent) (got []string, tags []int64, synced sseEvent) {
	t.Helper()
	for {
		ev := nextEvent(t, ch)
		if ev.name == "synced" {
			slices.Sort(got)
			return got, tags, ev
		}
		got = append(got, ev.String())
		tags = append(tags, ev.seq)
	}
}

// awayChanges makes the changes of a client's absence under /r/: /r/a
// changes, /r/b is deleted, /r/c is written and expires, /r/new is created,
// /r/keep stays, and /other outside changes too. That is 6 changes.
func awayChanges(t *testing.T, url string) {
	t.Helper()
	expiry := subscribe(t, url, "/r/c")
	do(t, "POST", url+"/r/a", `3`)
	do(t, "DELETE", url+"/r/b", "")
	do(t, "POST", url+"/r/c?ttl=20ms", `"brief"`)
	next(t, expiry)
	if ev := next(t, expiry); ev.rev != -1 { // the expiry is a change of its own
		t.Fatalf("waiting for /r/c to expire: got %v", ev)
	}
	do(t, "POST", url+"/r/new", `1`)
	do(t, "POST", url+"/other", `2`)
}

// TestResumeSSE: a stream cut off resumes from the last id it had, through
// Last-Event-ID (which wins over ?initial): it gets the current state of
// exactly the keys that changed meanwhile, deletes and expiries as
// missing, then synced, then live changes.
func TestResumeSSE(t *testing.T) {
	url := startServer(t)
	for _, k := range []string{"/r/a", "/r/b", "/r/c", "/r/keep", "/other"} {
		do(t, "POST", url+k, `1`)
	}
	ch, stop := openStream(t, url, "/r/?initial")
	got, tags, synced := untilSynced(t, ch)
	if want := []string{"/r/a:0=1", "/r/b:0=1", "/r/c:0=1", "/r/keep:0=1"}; !slices.Equal(got, want) {
		t.Errorf("initial state: got %v; want %v", got, want)
	}
	for i, tag := range tags {
		if tag != 0 {
			t.Errorf("initial state event %d: id ends with %d; want 0 (no resume point before synced)", i, tag)
		}
	}
	do(t, "POST", url+"/r/a", `2`)
	ev := next(t, ch)
	if ev.String() != "/r/a:1=2" || ev.seq != synced.seq+1 {
		t.Fatalf("live: got %v seq %d; want /r/a:1=2 seq %d", ev, ev.seq, synced.seq+1)
	}
	stop()

	awayChanges(t, url)
	ch, _ = openStream(t, url, "/r/?initial", "Last-Event-ID", ev.id)
	got, tags, synced = untilSynced(t, ch)
	if want := []string{"/r/a:2=3", "/r/b:-1=null", "/r/c:-1=null", "/r/new:0=1"}; !slices.Equal(got, want) {
		t.Errorf("resumed: got %v; want %v (the changed keys alone, /r/keep not resent)", got, want)
	}
	for i, tag := range tags {
		if tag != ev.seq {
			t.Errorf("resumed state event %d: id ends with %d; want %d, the point it resumed from", i, tag, ev.seq)
		}
	}
	if synced.seq != ev.seq+6 || synced.id != strconv.FormatInt(synced.seq, 10) || synced.data != "{}" {
		t.Errorf("synced: id %q data %s; want id %d (6 changes later) and data {}", synced.id, synced.data, ev.seq+6)
	}
	do(t, "POST", url+"/r/keep", `2`)
	if ev := next(t, ch); ev.String() != "/r/keep:1=2" || ev.seq != synced.seq+1 {
		t.Errorf("live after resuming: got %v seq %d; want /r/keep:1=2 seq %d", ev, ev.seq, synced.seq+1)
	}
}

// TestResumeReset: a resume point that cannot be served (too old for the
// history, malformed, ahead of the server, or from another run of it)
// gets reset, the whole state and synced, never a partial replay.
func TestResumeReset(t *testing.T) {
	srv, url := newTestServer(t, "-history", "10")
	for _, k := range []string{"/r/a", "/r/b", "/other"} {
		do(t, "POST", url+k, `1`)
	}
	ch, stop := openStream(t, url, "/r/")
	do(t, "POST", url+"/r/a", `2`)
	old := next(t, ch).id
	stop()
	for i := range 1000 { // far past what a history of 10 keeps
		srv.store.Set("/churn", strconv.Itoa(i), 0)
	}

	_, other := newTestServer(t)
	do(t, "POST", other+"/r/z", `1`)
	otherCh, stop := openStream(t, other, "/r/")
	do(t, "POST", other+"/r/z", `2`)
	otherRun := next(t, otherCh).id
	stop()

	ahead := fmt.Sprintf("/r/a:1:%d", srv.store.published.Load()+1000)
	for _, tt := range []struct{ name, id string }{
		{"older than the history", old},
		{"from another run", otherRun},
		{"ahead of the server", ahead},
		{"garbage", "garbage"},
		{"no number", "/r/a:1:x"},
		{"negative", "-7"},
		{"zero", "0"},
		{"too big", "/r/a:1:99999999999999999999"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ch, _ := openStream(t, url, "/r/", "Last-Event-ID", tt.id)
			if ev := nextEvent(t, ch); ev.name != "reset" || ev.data != "{}" {
				t.Fatalf("first event: got %v %q; want reset with data {}", ev, ev.data)
			}
			got, tags, _ := untilSynced(t, ch)
			if want := []string{"/r/a:1=2", "/r/b:0=1"}; !slices.Equal(got, want) {
				t.Errorf("after reset: got %v; want the whole state %v", got, want)
			}
			for _, tag := range tags {
				// 0, or a point that is older than the history for good:
				// either way, resuming from it resets again.
				if tag != 0 && tag != seqOf(tt.id) {
					t.Errorf("state tagged %d", tag)
				}
				if tag != 0 && tt.name == "ahead of the server" {
					t.Errorf("state tagged with a point ahead of the server: %d", tag)
				}
			}
		})
	}
}

// TestResumeWebSocket is TestResumeSSE over the WebSocket, with since, in
// both spellings of keys, and its resets.
func TestResumeWebSocket(t *testing.T) {
	url := startServer(t)
	for _, k := range []string{"/r/a", "/r/b", "/r/c", "/r/keep", "/other"} {
		do(t, "POST", url+k, `1`)
	}
	type msg struct {
		Type    string
		Payload struct {
			Key      string
			Value    json.RawMessage
			Revision int64
			Reason   string
			Seq      int64
		}
	}
	recv := func(t *testing.T, c *wsClient) msg {
		t.Helper()
		var m msg
		raw := c.recvRaw()
		if err := json.Unmarshal([]byte(raw), &m); err != nil {
			t.Fatalf("%s: %v", raw, err)
		}
		return m
	}
	// untilSynced returns the messages up to synced, each as "type key
	// value reason", and synced's seq; each must carry the seq tag.
	untilSynced := func(t *testing.T, c *wsClient, path string, tag int64) (got []string, seq int64) {
		t.Helper()
		for {
			m := recv(t, c)
			if m.Type == "synced" {
				if m.Payload.Key != path {
					t.Errorf("synced of %q; want %q", m.Payload.Key, path)
				}
				slices.Sort(got) // a state comes in the store's order, not the keys'
				return got, m.Payload.Seq
			}
			if m.Type != "reset" && m.Payload.Seq != tag {
				t.Errorf("%s %s before synced: seq %d; want %d", m.Type, m.Payload.Key, m.Payload.Seq, tag)
			}
			got = append(got, strings.TrimSpace(fmt.Sprintf("%s %s %s %s", m.Type, m.Payload.Key, m.Payload.Value, m.Payload.Reason)))
		}
	}

	for _, prefix := range []string{"r/", "/r/"} {
		t.Run(prefix, func(t *testing.T) {
			p := strings.TrimSuffix(prefix, "r/") // "" or "/": how this client spells /
			c := dialWS(t, url, "")
			c.send(`{"type":"subscribe","payload":{"key":"` + prefix + `","initial":true}}`)
			got, seq := untilSynced(t, c, prefix, 0)
			if want := []string{"value " + p + "r/a 1", "value " + p + "r/b 1", "value " + p + "r/c 1", "value " + p + "r/keep 1"}; !slices.Equal(got, want) {
				t.Errorf("initial: got %q; want %q", got, want)
			}
			do(t, "POST", url+"/r/a", `2`)
			live := recv(t, c)
			if live.Payload.Key != p+"r/a" || live.Payload.Seq != seq+1 {
				t.Errorf("live: got %+v; want %sr/a at seq %d", live, p, seq+1)
			}
			c.ws.Close()

			awayChanges(t, url)
			c = dialWS(t, url, "")
			c.send(fmt.Sprintf(`{"type":"subscribe","payload":{"key":%q,"since":%d}}`, prefix, live.Payload.Seq))
			got, seq = untilSynced(t, c, prefix, live.Payload.Seq)
			if want := []string{"no-value " + p + "r/b", "no-value " + p + "r/c", "value " + p + "r/a 3", "value " + p + "r/new 1"}; !slices.Equal(got, want) {
				t.Errorf("resumed: got %q; want %q", got, want)
			}
			if seq != live.Payload.Seq+6 {
				t.Errorf("synced at %d; want %d", seq, live.Payload.Seq+6)
			}

			for _, since := range []string{`0`, `"soon"`, `-3`, `1.5`, strconv.FormatInt(seq+1000, 10)} {
				c.send(fmt.Sprintf(`{"type":"subscribe","payload":{"key":%q,"since":%s}}`, prefix, since))
				if m := recv(t, c); m.Type != "reset" || m.Payload.Key != prefix {
					t.Errorf("since %s: got %+v; want reset {key: %q}", since, m, prefix)
				}
				got, _ := untilSynced(t, c, prefix, 0)
				if want := []string{"value " + p + "r/a 3", "value " + p + "r/keep 1", "value " + p + "r/new 1"}; !slices.Equal(got, want) {
					t.Errorf("since %s, after reset: got %q; want the whole state %q", since, got, want)
				}
			}
			// The state the next spelling's run starts from.
			do(t, "DELETE", url+"/r/new", "")
			do(t, "POST", url+"/r/a", `1`)
			do(t, "POST", url+"/r/b", `1`)
			do(t, "POST", url+"/r/c", `1`)
		})
	}
}

// TestResumeCountsOnlyChanges: resuming a stream of a prefix of 100,000
// keys after 10 changes sends those 10 and synced, not the 100,000.
func TestResumeCountsOnlyChanges(t *testing.T) {
	srv, url := newTestServer(t)
	for i := range 100_000 {
		srv.store.Set(fmt.Sprintf("/big/%06d", i), "1", 0)
	}
	// A live stream's first id is its position, before any change.
	resp, err := http.DefaultTransport.RoundTrip(sseRequest(t, url+"/big/"))
	if err != nil {
		t.Fatal(err)
	}
	start := ""
	for r := bufio.NewReader(resp.Body); start == ""; {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if id, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "id: "); ok {
			start = id
		}
	}
	resp.Body.Close()
	if seqOf(start) <= 0 {
		t.Fatalf("no position at the start of the stream: %q", start)
	}
	for i := range 10 {
		srv.store.Set(fmt.Sprintf("/big/%06d", i*9999), "2", 0)
	}
	ch := subscribe(t, url, "/big/", "Last-Event-ID", start)
	got, _, synced := untilSynced(t, ch)
	if len(got) != 10 || synced.seq != seqOf(start)+10 {
		t.Errorf("resumed a prefix of 100,000 keys after 10 changes: %d events, synced at +%d; want 10 and +10", len(got), synced.seq-seqOf(start))
	}
}

func sseRequest(t *testing.T, url string) *http.Request {
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", "text/event-stream")
	return req
}

// TestStateOfDeadSlot: a whole state reads the index a chunk at a time,
// then each key's version with its slot locked. A key deleted and written
// again between the two lives in a new slot; its state is the new slot's
// version, not the dead slot's missing one, which would also drop the
// pending change that wrote it again: the subscriber would never hold the
// key. (Found by TestResumeAtRandomCuts, one run in ten.)
func TestStateOfDeadSlot(t *testing.T) {
	s := NewStore(0, nil)
	s.Set("/p/k", "1", 0)
	v, _ := s.keys.Load("/p/k")
	dead := v.(*slot)
	sub := &subscription{path: "/p/", q: new(coalescer)}
	s.Subscribe(sub, fromScratch, nil)
	_, front := sub.q.drain()
	c := front.(*stateCursor)
	defer c.drop()
	// Between the cursor's read of the index and its read of the key:
	s.Delete("/p/k", -1)
	s.Set("/p/k", "2", 0)
	out := c.item(nil, rangeItem{key: "/p/k", sl: dead})
	if len(out) != 1 || out[0].e == nil || out[0].e.value != "2" {
		t.Fatalf("the state of a key written again in a new slot: %v; want its new version, 2", out)
	}
}

// TestResumeAtRandomCuts: while writers set, delete and expire keys, 50
// subscribers read their streams, each cut off after a random number of
// bytes (mid-event, mid-batch, mid-state), and resume from the last id
// they had, as EventSource does. When the writers stop, each resumes once
// more: every one must then hold exactly the server's state of what it
// watches, deletes included. In memory, and with -data, where changes are
// published by the flusher once written.
func TestResumeAtRandomCuts(t *testing.T) {
	t.Run("memory", func(t *testing.T) { resumeAtRandomCuts(t) })
	t.Run("data", func(t *testing.T) { resumeAtRandomCuts(t, "-data", t.TempDir()) })
}

func resumeAtRandomCuts(t *testing.T, args ...string) {
	srv, url := newTestServer(t, append([]string{"-history", "200", "-heartbeat", "10ms"}, args...)...)
	var stopWriters atomic.Bool
	stopped := make(chan struct{}) // ends the reads under way when the writers stop
	var writers sync.WaitGroup
	for w := range 4 {
		writers.Add(1)
		go func() {
			defer writers.Done()
			for i := 0; !stopWriters.Load(); i++ {
				key := fmt.Sprintf("/c/%d/%d", w%2, rand.IntN(12))
				switch rand.IntN(10) {
				case 0:
					srv.store.Delete(key, -1)
				case 1:
					srv.store.Set(key, strconv.Itoa(i), time.Duration(1+rand.IntN(30))*time.Millisecond)
				case 2:
					srv.store.Set("/elsewhere", "1", 0)
				default:
					srv.store.Set(key, strconv.Itoa(i), 0)
				}
				runtime.Gosched()
			}
		}()
	}

	paths := []string{"/c/", "/c/0/", "/c/1/3", "/"}
	var subscribers sync.WaitGroup
	views := make([]*view, 50)
	for i := range views {
		v := &view{path: paths[i%len(paths)], state: map[string]string{}}
		views[i] = v
		subscribers.Add(1)
		go func() {
			defer subscribers.Done()
			for !stopWriters.Load() {
				v.read(t, url, int64(1+rand.IntN(3000)), stopped)
			}
		}()
	}
	time.Sleep(2 * time.Second) // the writers run while the subscribers come and go
	stopWriters.Store(true)
	writers.Wait()
	close(stopped)
	subscribers.Wait()
	// A key whose deadline has passed is no longer listed, but its expiry
	// is a change only once its timer has run.
	waitFor(t, "every expiry", func() bool { return srv.store.expiry.Len() == 0 })

	rounds, resets := 0, 0
	for _, v := range views {
		v.read(t, url, -1, nil) // until synced: everything up to now
		rounds, resets = rounds+v.rounds, resets+v.resets
		want := map[string]string{}
		for _, it := range srv.store.List("/") {
			if covers(v.path, it.key) {
				want[it.key] = fmt.Sprintf("%d=%s", it.revision, it.value)
			}
		}
		if !mapsEqual(v.state, want) {
			t.Errorf("subscriber of %s after %d reconnects (%d resets): holds %v; the server %v", v.path, v.rounds, v.resets, v.state, want)
		}
	}
	t.Logf("%d subscribers, %d connections, %d resets", len(views), rounds, resets)
}

// view is what a client of an event stream holds, kept as client.js keeps
// it: a change or state sets or removes its key; after a reset, synced
// removes the keys the new state did not name.
type view struct {
	path   string
	state  map[string]string // key -> revision=value
	fresh  map[string]bool   // after a reset, until synced: the keys named since
	lastID string
	rounds int
	resets int
}

// apply takes in one event, and reports whether it was a synced.
func (v *view) apply(ev sseEvent) bool {
	switch {
	case ev.name == "reset":
		v.resets++
		v.fresh = map[string]bool{}
		return false
	case ev.name == "synced":
		for key := range v.state {
			if v.fresh != nil && !v.fresh[key] {
				delete(v.state, key)
			}
		}
		v.fresh = nil
		return true
	case ev.rev == -1:
		delete(v.state, ev.key)
	default:
		v.state[ev.key] = fmt.Sprintf("%d=%s", ev.rev, ev.data)
	}
	if v.fresh != nil {
		v.fresh[ev.key] = true
	}
	return false
}

// read opens the stream (resuming from v.lastID if v has one) and reads
// limit bytes of it, or, with limit -1, up to its synced; or until stop
// is closed.
func (v *view) read(t *testing.T, url string, limit int64, stop <-chan struct{}) {
	req := sseRequest(t, url+keyURL(v.path)+"?initial")
	if v.lastID != "" {
		req.Header.Set("Last-Event-ID", v.lastID)
	}
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		t.Errorf("subscribe: %v", err)
		return
	}
	defer resp.Body.Close()
	guard := time.AfterFunc(20*time.Second, func() { resp.Body.Close() }) // a hang breaker
	defer guard.Stop()
	finished := make(chan struct{})
	defer close(finished)
	go func() {
		select {
		case <-stop:
			resp.Body.Close()
		case <-finished:
		}
	}()
	var body io.Reader = resp.Body
	if limit >= 0 {
		body = io.LimitReader(body, limit)
	}
	v.rounds++
	v.lastID = readEvents(t, bufio.NewReader(body), v.lastID, func(ev sseEvent) bool {
		return !v.apply(ev) || limit >= 0
	})
}

// TestEveryIDIsSafe: an event stream cut off after any line leaves its
// client with a last id from which it can resume and miss nothing. One
// subscription is driven through the batches that hold the traps of SPEC
// 4a: a change during the initial state, a key changed again while
// pending, a heartbeat queued before a change, deletes, changes elsewhere,
// and random mixes. Each batch is written as the writers write it; then
// the bytes are cut after every line, and a client that read up to there
// (as EventSource does) and resumes from its last id must end with exactly
// the store's state, and say so with synced.
func TestEveryIDIsSafe(t *testing.T) {
	s := NewStore(0, nil)
	s.keepHistory(100)
	open := func(from int64) (*stream, []byte) {
		st := &stream{}
		sse := &sseStream{}
		sse.sub = subscription{path: "/p/", q: &st.q}
		st.proto = sse
		sse.resumeAt = s.Subscribe(&sse.sub, from, nil)
		return st, fmt.Appendf(nil, "retry: 2000\nid: %d\n\n", sse.resumeAt) // as handleEvents writes it
	}
	flush := func(st *stream, out []byte) []byte { // as the writers do, until nothing is pending
		for {
			out, _ = st.appendPending(out, s.published.Load(), &metrics{})
			if st.q.Len() == 0 {
				return out
			}
		}
	}

	for _, k := range []string{"/p/a", "/p/b", "/p/gone", "/p/other"} {
		s.Set(k, "0", 0)
	}
	st, out := open(fromScratch)
	s.Set("/p/a", "1", 0) // during the initial state, before synced
	out = flush(st, out)
	s.Set("/p/a", "2", 0) // a pending key changed again: it must not overtake /p/b
	s.Set("/p/b", "1", 0)
	s.Set("/p/a", "3", 0)
	out = flush(st, out)
	st.q.push(event{kind: evHeartbeat}) // queued while idle; then changes come before the drain
	s.Set("/p/c", "1", 0)
	s.Delete("/p/gone", -1)
	out = flush(st, out)
	s.Set("/q", "1", 0) // elsewhere: only a heartbeat moves the stream on
	st.q.push(event{kind: evHeartbeat})
	out = flush(st, out)
	rnd := rand.New(rand.NewPCG(1, 2))
	for i := range 300 {
		key := fmt.Sprintf("/p/k%d", rnd.IntN(6))
		switch rnd.IntN(8) {
		case 0:
			s.Delete(key, -1)
		case 1:
			st.q.push(event{kind: evHeartbeat})
		case 2:
			s.Set("/q", strconv.Itoa(i), 0)
		case 3:
			out = flush(st, out)
		default:
			s.Set(key, strconv.Itoa(i), 0)
		}
	}
	out = flush(st, out)
	s.Unsubscribe(&st.proto.(*sseStream).sub)

	want := map[string]string{}
	for _, it := range s.List("/p/") {
		want[it.key] = fmt.Sprintf("%d=%s", it.revision, it.value)
	}
	cuts, resets := 0, 0
	for cut := range len(out) + 1 {
		if cut > 0 && out[cut-1] != '\n' {
			continue
		}
		cuts++
		v := &view{path: "/p/", state: map[string]string{}}
		v.lastID = readEvents(t, bufio.NewReader(bytes.NewReader(out[:cut])), "", func(ev sseEvent) bool { v.apply(ev); return true })
		from := fromScratch // what ?initial asks, with no Last-Event-ID
		if v.lastID != "" {
			from = resumePoint(v.lastID)
		}
		rs, resumed := open(from)
		resumed = flush(rs, resumed)
		s.Unsubscribe(&rs.proto.(*sseStream).sub)
		synced := false
		readEvents(t, bufio.NewReader(bytes.NewReader(resumed)), v.lastID, func(ev sseEvent) bool {
			synced = v.apply(ev)
			return !synced
		})
		resets += v.resets
		if !synced || !mapsEqual(v.state, want) {
			t.Fatalf("cut after byte %d (%q), resumed from %q (synced %v): holds %v; the store %v",
				cut, out[max(0, cut-60):cut], v.lastID, synced, v.state, want)
		}
	}
	t.Logf("%d cuts of %d bytes, %d of them resumed with a reset", cuts, len(out), resets)
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// BenchmarkHistoryMemory reports the heap the history takes per change it
// remembers: writes of 1,000 short keys, or of one 4,000-byte key, with
// -history as large as the writes, each write's key a fresh string as a
// request brings it. Run it with -benchtime=1x.
func BenchmarkHistoryMemory(b *testing.B) {
	for _, tt := range []struct {
		name string
		keys []string
		n    int
	}{
		{"1000keys", benchKeys(1000), 1_000_000},
		{"key=4000B", []string{"/" + strings.Repeat("k", 3999)}, 100_000},
	} {
		b.Run(tt.name, func(b *testing.B) {
			for range b.N {
				s := NewStore(0, nil)
				s.keepHistory(tt.n)
				for _, k := range tt.keys {
					s.Set(k, "1", 0)
				}
				before := heapInUse()
				for i := range tt.n {
					s.Set(strings.Clone(tt.keys[i%len(tt.keys)]), "1", 0)
				}
				after := heapInUse()
				b.ReportMetric(float64(after-before)/float64(tt.n), "B/change")
				runtime.KeepAlive(s)
			}
		})
	}
}

// TestResumeKeysBounded: the keys a since state lists to send, in key
// order, count against the connection's bound (SPEC 10) while the state
// is in progress, at most sinceMax of them, and stop counting once it is
// whole. Each state is read as a writer reads it, chunk by chunk: 2,000
// keys changed twice each come once each, in key order; past sinceMax
// keys changed, the resume is a reset and the whole state, which lists
// no keys.
func TestResumeKeysBounded(t *testing.T) {
	for _, tt := range []struct {
		keys, writes int
		reset        bool
	}{
		{2_000, 2, false},
		{sinceMax + 1, 1, true},
	} {
		t.Run(fmt.Sprintf("%dkeys", tt.keys), func(t *testing.T) {
			s := NewStore(0, nil)
			s.keepHistory(2 * tt.keys * tt.writes)
			s.Set("/start", "0", 0)
			since := s.published.Load()
			for i := range tt.keys {
				for range tt.writes {
					s.Set(fmt.Sprintf("/k/%06d", i), "1", 0)
				}
			}
			s.Set("/other", "1", 0) // changed, not watched
			sub := &subscription{path: "/k/", q: &coalescer{}}
			s.Subscribe(sub, since, nil)
			batch, front := sub.q.drain()
			sub.q.recycle(batch)
			if front == nil {
				t.Fatal("no state queued")
			}
			var sent []string
			resets := 0
			for {
				var chunk [stateChunk + 2]event
				states, done := front.read(chunk[:0])
				for _, ev := range states {
					switch ev.kind {
					case evState:
						sent = append(sent, ev.key)
					case evReset:
						resets++
					}
				}
				if done {
					sub.q.endFront()
					break
				}
				size := sub.q.size.Load()
				if want := int64(cursorWeight + seenWeight*tt.keys); !tt.reset && size != want {
					t.Fatalf("after %d keys sent: the queue counts %d B; want %d (the cursor and %d B a key listed)", len(sent), size, want, seenWeight)
				}
				if tt.reset && size != cursorWeight {
					t.Fatalf("after %d keys sent: the queue counts %d B; want %d", len(sent), size, cursorWeight)
				}
			}
			if len(sent) != tt.keys || resets != btoi(tt.reset) {
				t.Errorf("sent %d keys and %d resets; want %d and %d", len(sent), resets, tt.keys, btoi(tt.reset))
			}
			if !slices.IsSorted(sent) || len(slices.Compact(slices.Clone(sent))) != len(sent) {
				t.Errorf("keys not sent once each in key order")
			}
			if got := sub.q.size.Load(); got != 0 {
				t.Errorf("after synced the queue counts %d B; want 0", got)
			}
		})
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}
