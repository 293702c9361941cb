package main

// What a subscriber of a cluster sees across failures (SPEC 12,
// "Failures"): etcd stopped and started again while its node could not
// see it.

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// A got is what a subscriber got: a change of a key (its value and
// revision; "null" and -1 once missing) or a named event (synced,
// reset), and the resume point it carried.
type got struct {
	name       string // "" for a change
	key, value string
	rev, seq   int64
}

func (g got) String() string {
	if g.name != "" {
		return fmt.Sprintf("%s@%d", g.name, g.seq)
	}
	return fmt.Sprintf("%s:%d=%s@%d", g.key, g.rev, g.value, g.seq)
}

// gotSSE and gotWS read an event stream's and a WebSocket subscription's
// messages as gots, on a channel that closes with the connection.
func gotSSE(ch <-chan sseEvent) <-chan got {
	out := make(chan got, 1024)
	go func() {
		defer close(out)
		for ev := range ch {
			out <- got{name: ev.name, key: ev.key, value: ev.data, rev: ev.rev, seq: ev.seq}
		}
	}()
	return out
}

func gotWS(ch <-chan serverMsg) <-chan got {
	out := make(chan got, 1024)
	go func() {
		defer close(out)
		for m := range ch {
			p := m.Payload
			switch m.Type {
			case "value":
				out <- got{key: p.Key, value: string(p.Value), rev: *p.Revision, seq: p.Seq}
			case "no-value":
				out <- got{key: p.Key, value: "null", rev: -1, seq: p.Seq}
			case "synced", "reset":
				out <- got{name: m.Type, seq: p.Seq}
			default:
				out <- got{name: "unexpected " + m.raw}
			}
		}
	}()
	return out
}

// A watcher is one subscription the test follows: what it holds of its
// path (by key, the value), applied change by change.
type watcher struct {
	what string // for messages: "the event stream of /e/ on A"
	ch   <-chan got
	view map[string]string
}

// take returns the next thing the subscription got; the connection
// ending, or nothing for long, fails the test.
func (w *watcher) take(t *testing.T, waiting string) got {
	t.Helper()
	select {
	case g, ok := <-w.ch:
		if !ok {
			t.Fatalf("%s closed while waiting for %s; want it open throughout", w.what, waiting)
		}
		if g.name == "" {
			if g.rev < 0 {
				delete(w.view, g.key)
			} else {
				w.view[g.key] = g.value
			}
		}
		return g
	case <-time.After(30 * time.Second): // a hang breaker, not a timing assertion
		t.Fatalf("%s: nothing came while waiting for %s", w.what, waiting)
		return got{}
	}
}

// synced reads the subscription's state to its synced, and returns the
// keys the state held (deleted ones included) and the synced.
func (w *watcher) synced(t *testing.T) (keys []string, synced got) {
	t.Helper()
	for {
		g := w.take(t, "its state")
		switch g.name {
		case "synced":
			return keys, g
		case "":
			keys = append(keys, g.key)
		default:
			t.Fatalf("%s: got %s in its state; want its keys, then synced", w.what, g)
		}
	}
}

// until reads changes until the view is want, and returns them; a named
// event among them fails the test.
func (w *watcher) until(t *testing.T, want map[string]string) []got {
	t.Helper()
	var changes []got
	for !maps.Equal(w.view, want) {
		g := w.take(t, fmt.Sprintf("its view to be %v (it is %v)", want, w.view))
		if g.name != "" {
			t.Fatalf("%s: got %s after %v; want changes only (no reset)", w.what, g, changes)
		}
		changes = append(changes, g)
	}
	return changes
}

// listedView returns what a node lists under prefix, by key.
func listedView(t *testing.T, url, prefix string) map[string]string {
	t.Helper()
	var items []listedItem
	if err := json.Unmarshal([]byte(mustDo(t, 200, "GET", url+prefix, "").body), &items); err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, it := range items {
		m[it.Key] = string(it.Value)
	}
	return m
}

// under keeps the keys of view that path (a key, or a prefix ending in
// "/") covers.
func under(view map[string]string, path string) map[string]string {
	m := map[string]string{}
	for _, k := range covered(slices.Collect(maps.Keys(view)), path) {
		m[k] = view[k]
	}
	return m
}

// TestClusterEtcdReturns: etcd stopped (every member), then started
// again while node A still cannot reach it (each member behind a proxy
// cut off, as a partition would) and node B, which can, writes, and a
// client puts a key straight into etcd. A's subscribers, event streams
// and WebSocket subscriptions of a prefix and of a key, stay open
// throughout; A's /healthz answers 503 the whole time it cannot see
// etcd, and its view does not move. Once A reaches etcd, each subscriber
// gets every key that changed meanwhile, at its latest, in seq order,
// nothing else and no reset, and the next change live; a stream resumed
// on A from where it stood before etcd stopped gets exactly those keys,
// then synced.
func TestClusterEtcdReturns(t *testing.T) {
	t.Parallel()
	c := startEtcd(t, 3)
	var proxies []*etcdProxy
	var throughProxies []string
	for i := range c.members {
		p := newEtcdProxy(t, c, i)
		proxies = append(proxies, p)
		throughProxies = append(throughProxies, p.url)
	}
	prefix := newPrefix()
	a := startNode(t, throughProxies, prefix, "-write-timeout", "2s")
	b := startNode(t, c.endpoints(), prefix, "-write-timeout", "2s")
	mustDo(t, 200, "POST", b.url+"/", `{"ops":[{"op":"set","key":"/e/keep","value":1},{"op":"set","key":"/e/change","value":1},`+
		`{"op":"set","key":"/e/del","value":1},{"op":"set","key":"/e/gone","value":1}]}`)

	watchers := []*watcher{
		{what: "the event stream of /e/ on A", ch: gotSSE(subscribe(t, a.url, "/e/?initial"))},
		{what: "the event stream of /e/change on A", ch: gotSSE(subscribe(t, a.url, "/e/change?initial"))},
		{what: "the WebSocket subscription of /e/ on A", ch: gotWS(wsSubscribed(t, a.url, "/e/", `,"initial":true`))},
		{what: "the WebSocket subscription of /e/change on A", ch: gotWS(wsSubscribed(t, a.url, "/e/change", `,"initial":true`))},
	}
	paths := []string{"/e/", "/e/change", "/e/", "/e/change"}
	before := listedView(t, b.url, "/e/")
	var resumeFrom int64
	for i, w := range watchers {
		w.view = map[string]string{}
		_, synced := w.synced(t)
		resumeFrom = synced.seq
		if !maps.Equal(w.view, under(before, paths[i])) {
			t.Fatalf("%s: its state %v; want %v", w.what, w.view, under(before, paths[i]))
		}
	}

	// A is cut off from etcd (and stays so until etcd is back), then etcd
	// stops: neither node can see it.
	for _, p := range proxies {
		p.cutOff()
	}
	for i := range c.members {
		c.stop(i)
	}
	for _, n := range []*clusterNode{a, b} {
		waitFor(t, "/healthz to say etcd is out of reach", func() bool {
			h := n.health()
			return h.code == 503 && strings.Contains(h.body, "etcd out of reach")
		})
	}
	// B is refused connections: nothing was sent. A's requests are cut
	// off once sent (a partition): it cannot tell. Either 503 says so.
	if r := do(t, "POST", b.url+"/e/change", "9"); r.code != 503 || !strings.Contains(r.body, "nothing was applied") {
		t.Errorf("POST on B with etcd stopped: %d %s; want 503, nothing applied", r.code, r.body)
	}
	if r := do(t, "POST", a.url+"/e/change", "9"); r.code != 503 || !strings.Contains(r.body, "outcome is unknown") && !strings.Contains(r.body, "nothing was applied") {
		t.Errorf("POST on A, cut off: %d %s; want 503 saying whether it was applied", r.code, r.body)
	}

	// etcd starts again; A still cannot reach it; B writes.
	c.start(c.indexes()...)
	waitFor(t, "B healthy again", func() bool { return b.health().code == 200 })
	cutOff := func(after string) {
		t.Helper()
		if h := a.health(); h.code != 503 {
			t.Errorf("A's /healthz after %s: %d %s; want 503 while it cannot see etcd", after, h.code, h.body)
		}
		if e := a.srv.store.Get("/e/change"); e == nil || e.value != "1" {
			t.Errorf("A's view of /e/change after %s: %v; want it still 1, as before etcd stopped", after, e)
		}
	}
	for _, w := range []struct {
		method, path, body string
		headers            []string
	}{
		{"POST", "/e/change", "2", nil},
		{"DELETE", "/e/del", "", nil},
		{"POST", "/", `{"ops":[{"op":"set","key":"/e/t/1","value":1},{"op":"set","key":"/e/t/2","value":2},{"op":"delete","key":"/e/gone"}]}`, nil},
		{"PUT", "/e/change", "3", []string{"X-Revision", "2"}},
		{"POST", "/e/deep/er", `{"a":[1,"two"]}`, nil},
	} {
		mustDo(t, 200, w.method, b.url+w.path, w.body, w.headers...)
		cutOff(w.method + " " + w.path + " on B")
	}
	etcdPutAll(t, c.newClient(), prefix+"/e/raw", `"put straight into etcd"`)
	cutOff("a put straight into etcd")
	if r := do(t, "GET", a.url+"/e/change", ""); r.code != 503 {
		t.Errorf("GET on A while it cannot see etcd: %d %s; want 503", r.code, r.body)
	}
	after := listedView(t, b.url, "/e/")
	var changed []string // the keys whose values differ, in order
	for k := range maps.Keys(union(before, after)) {
		if bv, ok := before[k]; !ok || after[k] != bv {
			changed = append(changed, k)
		}
	}
	slices.Sort(changed)

	// A reaches etcd again.
	for _, p := range proxies {
		p.cut.Store(false)
	}
	waitFor(t, "A healthy again", func() bool { return a.health().code == 200 })
	for i, w := range watchers {
		changes := w.until(t, under(after, paths[i]))
		var keys []string
		for j, g := range changes {
			keys = append(keys, g.key)
			if j > 0 && g.seq < changes[j-1].seq {
				t.Errorf("%s: %s after %s: resume points go back", w.what, g, changes[j-1])
			}
		}
		slices.Sort(keys)
		if want := covered(changed, paths[i]); !slices.Equal(slices.Compact(keys), want) {
			t.Errorf("%s: got %v; want changes of %v, the keys changed while A could not see etcd", w.what, changes, want)
		}
		t.Logf("%s, open throughout, got after etcd's return: %v", w.what, changes)
	}
	// The next change comes live, and nothing before it.
	mustDo(t, 200, "POST", a.url+"/e/change", "4")
	for _, w := range watchers {
		if g := w.take(t, "the change after etcd's return"); g.name != "" || g.key != "/e/change" || g.value != "4" || g.rev != 3 {
			t.Errorf("%s: got %s; want /e/change:3=4", w.what, g)
		}
	}
	after["/e/change"] = "4"
	if la, lb := listedView(t, a.url, "/e/"), listedView(t, b.url, "/e/"); !maps.Equal(la, after) || !maps.Equal(lb, after) {
		t.Errorf("A lists %v; B %v; want both %v", la, lb, after)
	}

	// Resumed on A from before etcd stopped: each key changed since, at
	// its latest (missing for a key deleted), then synced; no reset.
	from := strconv.FormatInt(resumeFrom, 10)
	for _, w := range []*watcher{
		{what: "an event stream of /e/ resumed on A", ch: gotSSE(subscribe(t, a.url, "/e/", "Last-Event-ID", from))},
		{what: "a WebSocket subscription of /e/ resumed on A", ch: gotWS(wsSubscribed(t, a.url, "/e/", `,"since":`+from))},
	} {
		w.view = maps.Clone(before)
		keys, _ := w.synced(t)
		if slices.Sort(keys); !slices.Equal(keys, changed) || !maps.Equal(w.view, after) {
			t.Errorf("%s from %s: got the keys %v, making %v; want %v, making %v", w.what, from, keys, w.view, changed, after)
		}
	}
}

// union returns the keys of a and b, each once.
func union(a, b map[string]string) map[string]bool {
	m := map[string]bool{}
	for k := range a {
		m[k] = true
	}
	for k := range b {
		m[k] = true
	}
	return m
}

// covered keeps the keys that path (a key, or a prefix ending in "/")
// covers.
func covered(keys []string, path string) []string {
	var out []string
	for _, k := range keys {
		if k == path || strings.HasSuffix(path, "/") && strings.HasPrefix(k, path) {
			out = append(out, k)
		}
	}
	return out
}
