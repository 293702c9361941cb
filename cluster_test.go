package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The cluster (-etcd, SPEC section 12) against real etcd clusters, which
// the harness of etcd_test.go starts: nodes run in-process, wired as run
// wires them (joinCluster), so that a test can also look inside one.

// A clusterNode is one node of a cluster, served on loopback.
type clusterNode struct {
	t    *testing.T
	srv  *server
	url  string
	log  *syncBuffer
	stop func() // returns once the node has stopped; the test's end calls it
}

// syncBuffer is a node's log, written by its goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// etcdPrefixes makes each node group's -etcd-prefix unique, so that tests
// can share an etcd cluster (and show that a prefix keeps to itself).
var etcdPrefixes atomic.Int64

// newPrefix returns an -etcd-prefix no other test uses.
func newPrefix() string { return fmt.Sprintf("/atomkv%d", etcdPrefixes.Add(1)) }

// startNode starts a node of the cluster whose store is the etcd at
// endpoints, under prefix, with flags added; it returns once the node
// serves (once its view is current, as run does). Its log is shown if
// the test fails.
func startNode(t *testing.T, endpoints []string, prefix string, flags ...string) *clusterNode {
	t.Helper()
	args := append([]string{"-etcd", strings.Join(endpoints, ","), "-etcd-prefix", prefix}, flags...)
	cfg, err := parseConfig(args, func(string) string { return "" }, new(strings.Builder))
	if err != nil {
		t.Fatal(err)
	}
	n := &clusterNode{t: t, log: new(syncBuffer)}
	n.srv, err = newServer(cfg, slog.New(slog.NewTextHandler(n.log, nil)))
	if err != nil {
		t.Fatal(err)
	}
	closeCluster, err := joinCluster(n.srv)
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(n.srv.routes())
	n.srv.health.Store(healthServing)
	n.url = hs.URL
	var once sync.Once
	n.stop = func() {
		once.Do(func() {
			within(t, "the node to stop", func() {
				n.srv.health.Store(healthStopping)
				n.srv.close()
				hs.CloseClientConnections()
				hs.Close()
				n.srv.store.expiry.stop()
				closeCluster()
			})
		})
	}
	t.Cleanup(func() {
		n.stop()
		if t.Failed() {
			t.Logf("node %s (%s) log:\n%s", n.url, prefix, tail(n.log.String(), 30))
		}
	})
	return n
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// within runs f, and fails the test if it has not returned after a long
// guard: a hang breaker, not a timing assertion.
func within(t testing.TB, what string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatalf("gave up waiting for %s", what)
	}
}

// startNodes starts n nodes of one cluster on the etcd cluster c, under
// a prefix of their own.
func startNodes(t *testing.T, c *etcdCluster, n int, flags ...string) []*clusterNode {
	t.Helper()
	prefix := newPrefix()
	var nodes []*clusterNode
	for range n {
		nodes = append(nodes, startNode(t, c.endpoints(), prefix, flags...))
	}
	return nodes
}

// TestClusterNodeStops: a node stops, its watch open on a quiet prefix
// and streams and sockets open on it: closing the journal ends the watch
// rather than wait for a message that may never come.
func TestClusterNodeStops(t *testing.T) {
	t.Parallel()
	c := startEtcd(t, 1)
	n := startNodes(t, c, 1)[0]
	if r := do(t, "POST", n.url+"/a", "1"); r.code != 200 {
		t.Fatalf("POST: %d %s", r.code, r.body)
	}
	subscribe(t, n.url, "/")
	dialWS(t, n.url, "")
	n.stop()
	if n.srv.cluster.ctx.Err() == nil {
		t.Error("the journal's context is still live after the node stopped")
	}
}

// listedItem is an item of a listing.
type listedItem struct {
	Key      string          `json:"key"`
	Value    json.RawMessage `json:"value"`
	Revision int64           `json:"revision"`
}

// TestClusterReadsAcrossNodes: a write acknowledged by one node is seen
// by the other at once, hundreds of times in a row, by GET, listing and
// WebSocket get: the second node's read waits for its view to reach what
// etcd had committed when the read began.
func TestClusterReadsAcrossNodes(t *testing.T) {
	t.Parallel()
	nodes := startNodes(t, startEtcd(t, 1), 2)
	ws := []*wsClient{dialWS(t, nodes[0].url, ""), dialWS(t, nodes[1].url, "")}
	type version struct {
		value string
		rev   int64
	}
	want := map[string]version{}
	for i := range 300 {
		w, r := nodes[i%2].url, nodes[(i+1)%2].url
		key := fmt.Sprintf("/rw/%d", i%5)
		seq := int64(0)
		switch i % 6 {
		case 5:
			mustDo(t, 200, "DELETE", w+key, "")
			delete(want, key)
		case 3:
			// A transaction, whose answer gives its seq.
			resp := mustDo(t, 200, "POST", w+"/", fmt.Sprintf(`{"ops":[{"op":"set","key":%q,"value":%d},{"op":"set","key":"/rw/t","value":%d}]}`, key, i, i))
			var done struct {
				Seq       int64
				Revisions map[string]int64
			}
			json.Unmarshal([]byte(resp.body), &done)
			seq = done.Seq
			want[key] = version{strconv.Itoa(i), done.Revisions[key]}
			want["/rw/t"] = version{strconv.Itoa(i), done.Revisions["/rw/t"]}
		default:
			resp := mustDo(t, 200, "POST", w+key, strconv.Itoa(i))
			want[key] = version{strconv.Itoa(i), xRevision(resp)}
		}

		got := do(t, "GET", r+key, "")
		v, ok := want[key]
		if ok && (got.code != 200 || got.body != v.value || xRevision(got) != v.rev) || !ok && got.code != 404 {
			t.Fatalf("write %d on %s, GET %s on %s: %d %s at %d; want %v (present: %v)", i, w, key, r, got.code, got.body, xRevision(got), v, ok)
		}
		list := mustDo(t, 200, "GET", r+"/rw/", "")
		var items []listedItem
		if err := json.Unmarshal([]byte(list.body), &items); err != nil {
			t.Fatal(err)
		}
		listed := map[string]version{}
		for _, it := range items {
			listed[it.Key] = version{string(it.Value), it.Revision}
		}
		if !maps.Equal(listed, want) {
			t.Fatalf("write %d on %s, listing on %s: %v; want %v", i, w, r, listed, want)
		}
		if s, _ := strconv.ParseInt(list.header.Get("X-Seq"), 10, 64); s < seq {
			t.Fatalf("write %d on %s at seq %d, listing on %s: X-Seq %d", i, w, seq, r, s)
		}
		c := ws[(i+1)%2]
		c.send(fmt.Sprintf(`{"type":"get","id":%d,"payload":{"key":%q}}`, i, key))
		wantMsg := fmt.Sprintf(`{"type":"no-value","payload":{"key":%q},"id":%d}`, key, i)
		if ok {
			wantMsg = fmt.Sprintf(`{"type":"value","payload":{"key":%q,"value":%s,"revision":%d},"id":%d}`, key, v.value, v.rev, i)
		}
		if m := c.recv(); m != wantMsg {
			t.Fatalf("write %d on %s, WebSocket get on %s: %s; want %s", i, w, r, m, wantMsg)
		}
	}
}

// TestClusterResumeAcrossNodes: a stream read on one node resumes on
// another from its last id (SSE Last-Event-ID, WebSocket since), on a
// node that ran all along and on one started since: only what changed
// after, no reset. After etcd compacts its history past that point, a
// node that ran all along still remembers it (-history, SPEC 4a), but
// one started after the compaction does not, and resets, then sends the
// whole state; from a point after the compaction it resumes.
func TestClusterResumeAcrossNodes(t *testing.T) {
	t.Parallel()
	c := startEtcd(t, 1)
	prefix := newPrefix()
	a := startNode(t, c.endpoints(), prefix)
	b := startNode(t, c.endpoints(), prefix)
	mustDo(t, 200, "POST", a.url+"/", `{"ops":[{"op":"set","key":"/r/a","value":1},{"op":"set","key":"/r/b","value":1},{"op":"set","key":"/r/c","value":1}]}`)

	sse, stop := openStream(t, a.url, "/r/")
	ws := wsSubscribed(t, a.url, "/r/", "")
	mustDo(t, 200, "POST", b.url+"/r/a", `2`)
	mustDo(t, 200, "POST", b.url+"/r/d", `1`)
	last := nextEvent(t, sse)
	last = nextEvent(t, sse)
	wsNext(t, ws)
	since := wsNext(t, ws).Payload.Seq
	if last.String() != "/r/d:0=1" || since != last.seq {
		t.Fatalf("the streams on %s: %s, WebSocket at %d; want /r/d:0=1, at the same seq", a.url, last, since)
	}
	stop()

	// Meanwhile: a change, a delete, a new key, a transaction, an expiry.
	mustDo(t, 200, "POST", a.url+"/r/b", `2`)
	mustDo(t, 200, "DELETE", b.url+"/r/c", "")
	mustDo(t, 200, "POST", a.url+"/r/e", `1`, "X-TTL", "100ms")
	mustDo(t, 200, "POST", b.url+"/", `{"ops":[{"op":"set","key":"/r/f","value":1},{"op":"set","key":"/r/b","value":3}]}`)
	waitFor(t, "/r/e to expire", func() bool { return do(t, "GET", a.url+"/r/e", "").code == 404 })
	mustDo(t, 200, "POST", a.url+"/other", `1`) // outside the path

	sinceState := "/r/b:2=3 /r/c:-1=null /r/e:-1=null /r/f:0=1 synced"
	wsState := "/r/b:2=3 /r/c:-1 /r/e:-1 /r/f:0=1 synced"
	resumes := func(n *clusterNode, from sseEvent, wantSSE, wantWS string) {
		t.Helper()
		ch, stop := openStream(t, n.url, "/r/", "Last-Event-ID", from.id)
		defer stop()
		k := len(strings.Fields(wantSSE))
		if got := eventStrings(sseEvents(t, ch, k)); stripSeq(got) != wantSSE {
			t.Errorf("SSE on %s from %s: %s; want %s", n.url, from.id, got, wantSSE)
		}
		w := wsSubscribed(t, n.url, "/r/", fmt.Sprintf(`,"since":%d`, from.seq))
		var msgs []serverMsg
		for range k {
			msgs = append(msgs, wsNext(t, w))
		}
		if got := eventStrings(msgs); got != wantWS {
			t.Errorf("WebSocket on %s since %d: %s; want %s", n.url, from.seq, got, wantWS)
		}
		// Then live.
		mustDo(t, 200, "POST", a.url+"/r/live", fmt.Sprint(from.seq))
		if ev := next(t, ch); ev.key != "/r/live" || ev.data != fmt.Sprint(from.seq) {
			t.Errorf("SSE on %s after synced: %s; want the write of /r/live", n.url, ev)
		}
		if m := wsNext(t, w); m.Payload.Key != "/r/live" || string(m.Payload.Value) != fmt.Sprint(from.seq) {
			t.Errorf("WebSocket on %s after synced: %s; want the write of /r/live", n.url, m.raw)
		}
		mustDo(t, 200, "DELETE", a.url+"/r/live", "")
		next(t, ch)
		wsNext(t, w)
	}
	resumes(b, last, sinceState, wsState)
	// resumes wrote /r/live and deleted it: a change since the point too.
	sinceState = strings.Replace(sinceState, " synced", " /r/live:-1=null synced", 1)
	wsState = strings.Replace(wsState, " synced", " /r/live:-1 synced", 1)
	fresh := startNode(t, c.endpoints(), prefix) // its history is etcd's
	resumes(fresh, last, sinceState, wsState)

	// etcd compacts its history past the point.
	mustDo(t, 200, "POST", b.url+"/r/g", `1`)
	rev := etcdPutAll(t, c.newClient(), "/outside/atomkv", "x")
	compactAt(t, c, rev)

	// A node that ran all along remembers: it resumes, no reset.
	resumes(b, last, strings.Replace(sinceState, " /r/live", " /r/g:0=1 /r/live", 1), strings.Replace(wsState, " /r/live", " /r/g:0=1 /r/live", 1))
	// One started after the compaction cannot know what changed: a
	// reset, then the whole state.
	b.stop()
	b = startNode(t, c.endpoints(), prefix)
	whole := "/r/a:1=2 /r/b:2=3 /r/d:0=1 /r/f:0=1 /r/g:0=1 synced"
	resumes(b, last, "reset "+whole, "reset "+whole)
	// From a point after the compaction, it resumes.
	mustDo(t, 200, "POST", a.url+"/r/h", `1`)
	resumes(b, sseEvent{id: fmt.Sprint(rev), seq: rev}, "/r/h:0=1 /r/live:-1=null synced", "/r/h:0=1 /r/live:-1 synced")
}

// stripSeq removes the seqs of named events from eventStrings' text.
func stripSeq(s string) string {
	var out []string
	for _, f := range strings.Fields(s) {
		if i := strings.IndexByte(f, '@'); i > 0 && !strings.HasPrefix(f, "/") {
			f = f[:i]
		}
		out = append(out, f)
	}
	return strings.Join(out, " ")
}

// TestClusterExpiry: keys with a TTL expire once, though every node
// tries: each node's stream has one expiry event of each key, with the
// same seq on both, and etcd holds the marker in that revision. With no
// node running, etcd's lease deletes a key; a node that does not expire
// keys itself (its timer stopped) reports that delete as an expiry.
func TestClusterExpiry(t *testing.T) {
	t.Parallel()
	c := startEtcd(t, 1)
	etcd := c.newClient()
	prefix := newPrefix()
	nodes := []*clusterNode{startNode(t, c.endpoints(), prefix), startNode(t, c.endpoints(), prefix)}
	var ws []<-chan serverMsg
	for _, n := range nodes {
		ws = append(ws, wsSubscribed(t, n.url, "/x/", ""))
	}
	const keys = 20
	for i := range keys {
		mustDo(t, 200, "POST", nodes[i%2].url+fmt.Sprintf("/x/%02d", i), `1`, "X-TTL", "300ms")
	}
	expired := make([]map[string]int64, 2) // of each node, key -> seq
	for i := range nodes {
		expired[i] = map[string]int64{}
		for len(expired[i]) < keys {
			m := wsNext(t, ws[i])
			switch {
			case m.Type == "value":
			case m.Type == "no-value" && m.Payload.Reason == "expired":
				if _, again := expired[i][m.Payload.Key]; again {
					t.Errorf("node %d: a second expiry of %s", i, m.Payload.Key)
				}
				expired[i][m.Payload.Key] = m.Payload.Seq
			default:
				t.Fatalf("node %d: %s; want the writes and their expiries", i, m.raw)
			}
		}
	}
	if !maps.Equal(expired[0], expired[1]) {
		t.Errorf("expiries: node 0 %v, node 1 %v; want the same seqs", expired[0], expired[1])
	}
	mustDo(t, 200, "POST", nodes[0].url+"/x/after", `1`)
	for i := range nodes {
		if m := wsNext(t, ws[i]); m.String() != "/x/after:0=1" {
			t.Errorf("node %d, after the expiries: %s; want the write of /x/after, nothing between", i, m.raw)
		}
	}
	r, err := etcd.rangeKeys(etcdCtx(t), etcdRange{Key: []byte(prefix + "/x/0"), RangeEnd: etcdPrefixEnd([]byte(prefix + "/x/0"))})
	if err != nil || len(r.KVs) != 0 {
		t.Errorf("etcd after the expiries: %v, %v; want none of the keys", r, err)
	}
	marker, err := etcd.rangeKeys(etcdCtx(t), etcdRange{Key: []byte(prefix + etcdMarker)})
	if err != nil || len(marker.KVs) != 1 || expired[0][string(marker.KVs[0].Value)] != marker.KVs[0].ModRevision {
		t.Errorf("the expiry marker: %v, %v; want the last expired key, at its expiry's seq", marker, err)
	}

	// No node runs: the lease deletes a key after its deadline.
	mustDo(t, 200, "POST", nodes[0].url+"/x/lease", `1`, "X-TTL", "1s")
	for _, n := range nodes {
		n.stop()
	}
	waitFor(t, "etcd's lease to delete /x/lease", func() bool {
		r, err := etcd.rangeKeys(etcdCtx(t), etcdRange{Key: []byte(prefix + "/x/lease"), CountOnly: true})
		return err == nil && r.Count == 0
	})

	// A node that does not expire keys itself sees the lease's delete,
	// past the deadline, as an expiry.
	n := startNode(t, c.endpoints(), prefix)
	n.srv.store.expiry.stop()
	w := wsSubscribed(t, n.url, "/x/", "")
	mustDo(t, 200, "POST", n.url+"/x/leased", `1`, "X-TTL", "500ms")
	if m := wsNext(t, w); m.String() != "/x/leased:0=1" {
		t.Fatalf("%s; want the write", m.raw)
	}
	if m := wsNext(t, w); m.String() != "/x/leased:-1 expired" {
		t.Errorf("after the lease ended: %s; want the expiry of /x/leased", m.raw)
	}
}

// TestClusterFlags: -etcd with -data is refused at start, before anything
// is read or written, with an error that says why; so are a bad prefix,
// a bad endpoint, half a client certificate, and -max-txn-ops past what
// etcd takes.
func TestClusterFlags(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	noEnv := func(string) string { return "" }
	for _, tc := range []struct {
		args []string
		env  map[string]string
		want string
	}{
		{[]string{"-etcd", "http://127.0.0.1:1", "-data", dir}, nil, "-etcd and -data together: a node of a cluster keeps nothing on its disk (etcd does); use one or the other"},
		{[]string{"-data", dir}, map[string]string{"ATOMKV_ETCD": "http://127.0.0.1:1"}, "-etcd and -data together"},
		{[]string{"-etcd", "http://127.0.0.1:1"}, map[string]string{"ATOMKV_DATA": dir}, "-etcd and -data together"},
		{[]string{"-etcd", "http://127.0.0.1:1", "-etcd-prefix", "/atomkv/"}, nil, `-etcd-prefix "/atomkv/"`},
		{[]string{"-etcd", "http://127.0.0.1:1", "-etcd-prefix", ""}, nil, `-etcd-prefix ""`},
		{[]string{"-etcd", "127.0.0.1:2379"}, nil, `etcd endpoint "127.0.0.1:2379": want http(s)://host:port`},
		{[]string{"-etcd", "https://127.0.0.1:1", "-etcd-cert", "c.pem"}, nil, "-etcd-cert and -etcd-key go together"},
	} {
		getenv := noEnv
		if tc.env != nil {
			getenv = func(k string) string { return tc.env[k] }
		}
		err := run(context.Background(), append([]string{"-addr", "127.0.0.1:0"}, tc.args...), getenv, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("run %q (env %v): %v; want %q", tc.args, tc.env, err, tc.want)
		}
	}
	if names, _ := os.ReadDir(dir); len(names) != 0 {
		t.Errorf("-data %s holds %d files after the refusals; want none", dir, len(names))
	}

	c := startEtcd(t, 1)
	err := run(context.Background(), []string{"-addr", "127.0.0.1:0", "-etcd", c.members[0].client, "-max-txn-ops", "129"}, noEnv, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "-max-txn-ops 129 is more than etcd takes") {
		t.Errorf("-max-txn-ops 129 against etcd's 128: %v; want a refusal", err)
	}
}

// TestClusterStartsCurrent: a node answers only once its view is current:
// started on an etcd holding 5,000 keys under its prefix (and others
// outside) while a writer goes on, its first GET, listing and state show
// every key, and every write acknowledged before them.
func TestClusterStartsCurrent(t *testing.T) {
	t.Parallel()
	c := startEtcd(t, 1)
	etcd := c.newClient()
	prefix := newPrefix()
	const keys = 5000
	later := time.Now().Add(time.Hour).UnixNano()
	for i := 0; i < keys; i += 125 {
		var txn etcdTxn
		for j := i; j < i+125; j++ {
			e := &entry{value: fmt.Sprintf(`{"i":%d}`, j)}
			if j%10 == 0 {
				e.ttl = &deadline{at: later}
			}
			txn.Success = append(txn.Success, etcdOp{Put: &etcdPut{Key: []byte(fmt.Sprintf("%s/big/%05d", prefix, j)), Value: encodeEtcdValue(e)}})
		}
		if _, err := etcd.txn(etcdCtx(t), txn); err != nil {
			t.Fatal(err)
		}
	}
	etcdPutAll(t, etcd, prefix+"5/big/x", "1", prefix+"0", "1", prefix, "1") // beside the prefix, not under it

	var acked atomic.Int64
	stop, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		for n := int64(1); ; n++ {
			select {
			case <-stop:
				return
			default:
			}
			put := etcdTxn{Success: []etcdOp{{Put: &etcdPut{Key: []byte(prefix + "/live"), Value: []byte(strconv.FormatInt(n, 10))}}}}
			if _, err := etcd.txn(etcdCtx(t), put); err != nil {
				return
			}
			acked.Store(n)
		}
	}()
	defer func() { close(stop); <-stopped }()
	waitFor(t, "the writer's first write", func() bool { return acked.Load() > 0 })

	n := startNode(t, c.endpoints(), prefix)
	before := acked.Load()
	r := mustDo(t, 200, "GET", n.url+"/live", "")
	if v, _ := strconv.ParseInt(r.body, 10, 64); v < before {
		t.Errorf("the first GET of /live: %s; want at least %d, acknowledged before it", r.body, before)
	}
	var items []listedItem
	if err := json.Unmarshal([]byte(mustDo(t, 200, "GET", n.url+"/big/", "").body), &items); err != nil {
		t.Fatal(err)
	}
	if len(items) != keys {
		t.Fatalf("the first listing of /big/: %d keys; want %d", len(items), keys)
	}
	for i, it := range items {
		if want := fmt.Sprintf("/big/%05d", i); it.Key != want || string(it.Value) != fmt.Sprintf(`{"i":%d}`, i) || it.Revision != 0 {
			t.Fatalf("item %d: %+v; want %s = {\"i\":%d} at revision 0", i, it, want, i)
		}
	}
	if r := mustDo(t, 200, "GET", n.url+"/big/04990", ""); r.header.Get("X-TTL") == "" {
		t.Errorf("/big/04990: no X-TTL; want the hour it was written with")
	}
	evs, _, _ := untilSynced(t, subscribe(t, n.url, "/big/?initial"))
	if len(evs) != keys {
		t.Errorf("the state of /big/: %d keys; want %d", len(evs), keys)
	}
	if got := len(listAll(t, n.url)); got != keys+1 {
		t.Errorf("every key: %d; want %d (the 5,000 and /live, none from beside the prefix)", got, keys+1)
	}
}

// TestClusterLeaderLoss: a three-member etcd loses its leader, the member
// the node prefers, while the node takes a stream of writes: after the
// election, writes go on through another member; a write answered 503
// happened once or not at all (read back: the counter's value and
// revision say which), never twice; the node's stream has every change
// once, in order; and when the member is back the node's client prefers
// it again.
func TestClusterLeaderLoss(t *testing.T) {
	t.Parallel()
	c := startEtcd(t, 3)
	leader := c.leader()
	eps := []string{c.members[leader].client}
	for i := range c.members {
		if i != leader {
			eps = append(eps, c.members[i].client)
		}
	}
	n := startNode(t, eps, newPrefix(), "-write-timeout", "5s")
	events := subscribe(t, n.url, "/counter")

	var applied, unknown, notApplied atomic.Int64 // writes applied (so the counter's next revision), 503s each way
	var mu sync.Mutex
	var answers []string // the 503s
	stop, stopped := make(chan struct{}), make(chan struct{})
	errs := make(chan error, 1)
	go func() {
		defer close(stopped)
		fail := func(err error) { errs <- err }
		for i := 1; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			r, err := call("POST", n.url+"/counter", strconv.Itoa(i))
			switch {
			case err != nil:
				fail(err)
				return
			case r.code == 200:
				if rev := xRevision(r); rev != applied.Load() {
					fail(fmt.Errorf("write %d: revision %d; want %d (as many writes applied before it)", i, rev, applied.Load()))
					return
				}
				applied.Add(1)
				continue
			case r.code != 503:
				fail(fmt.Errorf("write %d: %d %s", i, r.code, r.body))
				return
			}
			// 503: read it back (reads may be refused too, during the
			// election).
			var back response
			for back, err = call("GET", n.url+"/counter", ""); err == nil && back.code == 503; back, err = call("GET", n.url+"/counter", "") {
			}
			switch {
			case err != nil:
				fail(err)
				return
			case back.code == 200 && back.body == strconv.Itoa(i) && xRevision(back) == applied.Load():
				applied.Add(1)
				unknown.Add(1)
			case applied.Load() == 0 && back.code == 404,
				back.code == 200 && back.body == strconv.Itoa(i-1) && xRevision(back) == applied.Load()-1:
				notApplied.Add(1)
			default:
				fail(fmt.Errorf("write %d answered %s; read back: %d %s at revision %d; want it applied once (revision %d) or not at all",
					i, r.body, back.code, back.body, xRevision(back), applied.Load()))
				return
			}
			mu.Lock()
			answers = append(answers, fmt.Sprintf("write %d: 503 %s; applied: %v", i, r.body, back.body == strconv.Itoa(i)))
			mu.Unlock()
			if !strings.Contains(r.body, "outcome is unknown") && !strings.Contains(r.body, "nothing was applied") {
				fail(fmt.Errorf("write %d: 503 %s; want it to say whether it was applied", i, r.body))
				return
			}
		}
	}()
	defer func() {
		select {
		case <-stopped:
		default:
			close(stop)
			<-stopped
		}
	}()
	writes := func(k int64) { // waits for k more writes applied
		t.Helper()
		want := applied.Load() + k
		waitFor(t, fmt.Sprintf("%d writes applied", want), func() bool {
			select {
			case err := <-errs:
				t.Fatal(err)
			default:
			}
			return applied.Load() >= want
		})
	}
	writes(20)
	c.kill(leader)
	writes(20) // after the election
	if ep := n.srv.cluster.c.endpoint(); ep == c.members[leader].client {
		t.Errorf("with member %d dead, the node's client still goes to it first", leader)
	}
	c.start(leader)
	id := c.memberID(leader)
	deadline := time.Now().Add(time.Minute) // its member is tried again at most 32 s after its last failure
	for {
		resp, err := n.srv.cluster.c.rangeKeys(etcdCtx(t), etcdRange{Key: []byte("/"), CountOnly: true})
		if err == nil && resp.Header.MemberID == id {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the node's client does not go back to member %d: %v", leader, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	writes(10)
	close(stop)
	<-stopped
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}

	total := applied.Load()
	r := mustDo(t, 200, "GET", n.url+"/counter", "")
	if xRevision(r) != total-1 {
		t.Errorf("the counter: revision %d; want %d (%d writes applied)", xRevision(r), total-1, total)
	}
	for rev := int64(-1); rev < total-1; {
		ev := next(t, events)
		if ev.rev <= rev {
			t.Fatalf("the stream: revision %d after %d; want each change once, in order", ev.rev, rev)
		}
		rev = ev.rev
	}
	t.Logf("%d writes applied; 503s: %d applied, %d not:\n%s", total, unknown.Load(), notApplied.Load(), strings.Join(answers, "\n"))
}

// health is what the node's admin /healthz answers.
func (n *clusterNode) health() response {
	rec := httptest.NewRecorder()
	n.srv.adminRoutes().ServeHTTP(rec, httptest.NewRequest("GET", "/healthz", nil))
	return response{rec.Code, rec.Header(), rec.Body.String()}
}

// TestClusterEtcdDown: with etcd gone, a node answers writes and reads
// 503 saying why, and /healthz 503; its streams and sockets stay open,
// and when etcd is back they go on from where they were, the node is
// healthy again, and writes and reads work.
func TestClusterEtcdDown(t *testing.T) {
	t.Parallel()
	c := startEtcd(t, 1)
	prefix := newPrefix()
	a := startNode(t, c.endpoints(), prefix, "-write-timeout", "1s")
	b := startNode(t, c.endpoints(), prefix, "-write-timeout", "1s")
	sse := subscribe(t, a.url, "/u/")
	ws := wsSubscribed(t, a.url, "/u/", "")
	mustDo(t, 200, "POST", b.url+"/u/a", `1`)
	if ev := next(t, sse); ev.String() != "/u/a:0=1" {
		t.Fatalf("SSE: %s", ev)
	}
	wsNext(t, ws)
	waitFor(t, "the node healthy", func() bool { return a.health().code == 200 })

	c.stop(0)
	waitFor(t, "/healthz to say etcd is out of reach", func() bool {
		h := a.health()
		return h.code == 503 && strings.Contains(h.body, "etcd out of reach")
	})
	for _, tc := range []struct{ method, path, body, want string }{
		{"POST", "/u/a", `2`, "etcd is unavailable: nothing was applied"},
		{"PUT", "/u/a", `2`, "etcd is unavailable: nothing was applied"},
		{"DELETE", "/u/a", ``, "etcd is unavailable: nothing was applied"},
		{"POST", "/", `{"ops":[{"op":"set","key":"/u/b","value":1}]}`, "etcd is unavailable: nothing was applied"},
		{"GET", "/u/a", ``, "etcd is out of reach: this node cannot tell that what it holds is current"},
		{"GET", "/u/", ``, "etcd is out of reach"},
	} {
		var h []string
		if tc.method == "PUT" {
			h = []string{"X-Revision", "1"}
		}
		r := do(t, tc.method, a.url+tc.path, tc.body, h...)
		if r.code != 503 || errorMessage(r) == "" || !strings.Contains(r.body, tc.want) {
			t.Errorf("%s %s with etcd down: %d %s; want 503 saying %q", tc.method, tc.path, r.code, r.body, tc.want)
		}
	}
	w := dialWS(t, a.url, "")
	w.send(`{"type":"get","id":1,"payload":{"key":"/u/a"}}`)
	if m := w.recv(); !strings.Contains(m, `"type":"error"`) || !strings.Contains(m, "etcd is out of reach") {
		t.Errorf("WebSocket get with etcd down: %s; want an error saying etcd is out of reach", m)
	}

	c.start(0)
	waitFor(t, "the node healthy again", func() bool { return a.health().code == 200 })
	mustDo(t, 200, "POST", b.url+"/u/a", `3`)
	if ev := next(t, sse); ev.String() != "/u/a:1=3" {
		t.Errorf("SSE after etcd's return: %s; want /u/a:1=3", ev)
	}
	if m := wsNext(t, ws); m.String() != "/u/a:1=3" {
		t.Errorf("WebSocket after etcd's return: %s; want /u/a:1=3", m.raw)
	}
	if r := mustDo(t, 200, "GET", a.url+"/u/a", ""); r.body != "3" {
		t.Errorf("GET after etcd's return: %s; want 3", r.body)
	}
}

// TestClusterStopsWhileEtcdHangs: a node stops while etcd hangs, a read
// waiting on it: nothing of the node goes on asking etcd after it stopped
// (the shared round trip of reads is the node's, not the first reader's,
// and ends with it).
func TestClusterStopsWhileEtcdHangs(t *testing.T) {
	t.Parallel()
	c := startEtcd(t, 1)
	n := startNodes(t, c, 1, "-write-timeout", "500ms")[0]
	mustDo(t, 200, "POST", n.url+"/h", `1`)
	c.pause(0)
	defer c.resume(0)
	waitFor(t, "a read to wait on etcd and fail", func() bool { return do(t, "GET", n.url+"/h", "").code == 503 })
	n.stop()
	j := n.srv.cluster
	waitFor(t, "the node's rounds of reads to end", func() bool {
		j.reads.mu.Lock()
		defer j.reads.mu.Unlock()
		return !j.reads.running
	})
}

// compactAt drops etcd's history before rev. A compaction is sent again
// after a failure, a timeout included: under load its first attempt can
// time out after etcd applied it, and the next is refused as compacted
// already, which is the success it reports.
func compactAt(t *testing.T, c *etcdCluster, rev int64) {
	t.Helper()
	if err := c.newClient().compact(etcdCtx(t), rev); err != nil && !errors.Is(err, errEtcdCompacted) {
		t.Fatal(err)
	}
}

// TestClusterEtcdHung: etcd hangs (takes connections, answers nothing,
// as a member cut off by a partition): reads fail with 503, and so does
// /healthz, though no connection closed and no request came to it; when
// etcd answers again, the node is healthy again.
func TestClusterEtcdHung(t *testing.T) {
	t.Parallel()
	c := startEtcd(t, 1)
	n := startNodes(t, c, 1, "-write-timeout", "1s")[0]
	mustDo(t, 200, "POST", n.url+"/h", `1`)
	waitFor(t, "the node healthy", func() bool { return n.health().code == 200 })
	c.pause(0)
	defer c.resume(0)
	waitFor(t, "/healthz to say etcd is out of reach", func() bool {
		h := n.health()
		return h.code == 503 && strings.Contains(h.body, "etcd out of reach")
	})
	if r := do(t, "GET", n.url+"/h", ""); r.code != 503 {
		t.Errorf("GET with etcd hung: %d %s; want 503", r.code, r.body)
	}
	c.resume(0)
	waitFor(t, "the node healthy again", func() bool { return n.health().code == 200 })
	mustDo(t, 200, "GET", n.url+"/h", "")
}

// TestClusterLargeValues: values near etcd's request limit (1.5 MiB)
// pass through a node, a change of one (its event carries the old value
// too) and a transaction of several; past the limit, with -max-value-bytes
// above it, a write is refused 413 saying why, and nothing is applied.
func TestClusterLargeValues(t *testing.T) {
	t.Parallel()
	nodes := startNodes(t, startEtcd(t, 1), 2, "-max-value-bytes", "4194304")
	value := func(n int, c byte) string { return `"` + strings.Repeat(string(c), n-2) + `"` }
	big := value(1400<<10, 'a')
	mustDo(t, 200, "POST", nodes[0].url+"/big/a", big)
	mustDo(t, 200, "POST", nodes[0].url+"/big/a", value(1400<<10, 'b'))
	if r := mustDo(t, 200, "GET", nodes[1].url+"/big/a", ""); r.body != value(1400<<10, 'b') || xRevision(r) != 1 {
		t.Errorf("GET /big/a on the other node: %d bytes at revision %d; want the second value, at 1", len(r.body), xRevision(r))
	}
	var ops []string
	for _, k := range []string{"b", "c", "d"} {
		ops = append(ops, fmt.Sprintf(`{"op":"set","key":"/big/%s","value":%s}`, k, value(450<<10, k[0])))
	}
	mustDo(t, 200, "POST", nodes[1].url+"/", `{"ops":[`+strings.Join(ops, ",")+`]}`)
	var items []listedItem
	if err := json.Unmarshal([]byte(mustDo(t, 200, "GET", nodes[0].url+"/big/", "").body), &items); err != nil || len(items) != 4 {
		t.Errorf("/big/ on the other node: %d items, %v; want 4", len(items), err)
	}

	for _, tc := range []struct{ method, path, body string }{
		{"POST", "/big/a", value(1600<<10, 'x')},
		{"POST", "/", `{"ops":[` + strings.Join(ops, ",") + `,{"op":"set","key":"/big/e","value":` + value(450<<10, 'e') + `}]}`},
	} {
		r := do(t, tc.method, nodes[0].url+tc.path, tc.body)
		if r.code != 413 || !strings.Contains(r.body, "as etcd takes it") {
			t.Errorf("%s %s of %d bytes: %d %s; want 413, etcd's limit", tc.method, tc.path, len(tc.body), r.code, r.body)
		}
	}
	if r := mustDo(t, 200, "GET", nodes[1].url+"/big/a", ""); xRevision(r) != 1 {
		t.Errorf("/big/a after the refusals: revision %d; want 1", xRevision(r))
	}
	mustDo(t, 404, "GET", nodes[1].url+"/big/e", "")
}

// TestClusterExpiredInEtcd: a key past its deadline that etcd still
// holds (no node expired it yet: their timers are stopped here) is
// missing to every read, and a write to it starts it again at revision
// 0: a create (PUT X-Revision 0), a transaction checking it missing, a
// POST; its expiry comes first, as a change of its own.
func TestClusterExpiredInEtcd(t *testing.T) {
	t.Parallel()
	c := startEtcd(t, 1)
	etcd := c.newClient()
	nodes := startNodes(t, c, 2)
	prefix := nodes[0].srv.cluster.prefix
	for _, n := range nodes {
		n.srv.store.expiry.stop()
	}
	ws := wsSubscribed(t, nodes[1].url, "/e/", "")
	for _, k := range []string{"/e/put", "/e/txn", "/e/post"} {
		mustDo(t, 200, "POST", nodes[0].url+k, `1`, "X-TTL", "100ms")
		wsNext(t, ws)
	}
	waitFor(t, "the deadlines to pass", func() bool { return do(t, "GET", nodes[1].url+"/e/post", "").code == 404 })
	if r, err := etcd.rangeKeys(etcdCtx(t), etcdRange{Key: []byte(prefix + "/e/"), RangeEnd: etcdPrefixEnd([]byte(prefix + "/e/")), CountOnly: true}); err != nil || r.Count != 3 {
		t.Fatalf("etcd holds %v keys (%v); want the 3, expired, not deleted", r, err)
	}
	if r := mustDo(t, 200, "GET", nodes[0].url+"/e/", ""); r.body != "[]" {
		t.Errorf("listing past the deadlines: %s; want []", r.body)
	}
	for _, w := range []struct{ method, path, body, rev string }{
		{"PUT", "/e/put", `2`, "0"},
		{"POST", "/", `{"check":[{"key":"/e/txn","revision":-1}],"ops":[{"op":"set","key":"/e/txn","value":2}]}`, ""},
		{"POST", "/e/post", `2`, ""},
	} {
		var h []string
		if w.rev != "" {
			h = []string{"X-Revision", w.rev}
		}
		mustDo(t, 200, w.method, nodes[1].url+w.path, w.body, h...)
	}
	for _, k := range []string{"/e/put", "/e/txn", "/e/post"} {
		if r := mustDo(t, 200, "GET", nodes[0].url+k, ""); r.body != "2" || xRevision(r) != 0 {
			t.Errorf("GET %s: %s at %d; want 2 at revision 0", k, r.body, xRevision(r))
		}
		// The expiry, then the write; a subscriber that does not keep up
		// may get the write's event in place of the expiry's (SPEC 4).
		m := wsNext(t, ws)
		if m.String() == k+":-1 expired" {
			m = wsNext(t, ws)
		}
		if m.String() != k+":0=2" {
			t.Errorf("the stream: %s; want the expiry of %s, then its write at 0", m.raw, k)
		}
	}
}

// TestClusterForeignWrites: etcd holds other data beside the prefix,
// written while the prefix is quiet: a node's read cannot wait for the
// watch to bring etcd's revision (it never will: the change is not the
// prefix's), and writes a fence after it (with -write-timeout 1s, a read
// that waited for the watch alone would end 503); what it reads is
// current.
func TestClusterForeignWrites(t *testing.T) {
	t.Parallel()
	c := startEtcd(t, 1)
	etcd := c.newClient()
	nodes := startNodes(t, c, 2, "-write-timeout", "1s")
	mustDo(t, 200, "POST", nodes[0].url+"/f", `1`)
	for i := range 5 {
		etcdPutAll(t, etcd, "/elsewhere", strconv.Itoa(i))
		if r := mustDo(t, 200, "GET", nodes[1].url+"/f", ""); r.body != "1" {
			t.Errorf("GET /f: %s; want 1", r.body)
		}
	}
	mustDo(t, 200, "POST", nodes[0].url+"/f", `2`)
	if r := mustDo(t, 200, "GET", nodes[1].url+"/f", ""); r.body != "2" {
		t.Errorf("GET /f after the write on the other node: %s; want 2", r.body)
	}
}

// An etcdProxy stands between nodes and an etcd member, so that a test
// can cut them off, as a partition would, and see what they ask.
type etcdProxy struct {
	url string
	cut atomic.Bool
	// before, if set, is called with each range request's body before it
	// goes on.
	before atomic.Pointer[func(body []byte)]
	// slowEvents, if set, holds back the first events of each watch that
	// long, as etcd holds a large history's first message while it reads
	// and encodes it.
	slowEvents atomic.Int64

	mu     sync.Mutex
	active map[*http.Request]context.CancelFunc
}

// newEtcdProxy serves a proxy of member i of c until the test ends.
func newEtcdProxy(t *testing.T, c *etcdCluster, i int) *etcdProxy {
	t.Helper()
	target, err := url.Parse(c.members[i].client)
	if err != nil {
		t.Fatal(err)
	}
	p := &etcdProxy{active: map[*http.Request]context.CancelFunc{}}
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.FlushInterval = -1 // a watch's messages as they come
	rp.ErrorLog = log.New(io.Discard, "", 0)
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if p.cut.Load() {
			if conn, _, err := http.NewResponseController(w).Hijack(); err == nil {
				conn.Close() // the connection breaks, as across a partition
			}
			return
		}
		if before := p.before.Load(); before != nil && r.URL.Path == "/v3/kv/range" {
			body, _ := io.ReadAll(r.Body)
			(*before)(body)
			r.Body = io.NopCloser(bytes.NewReader(body))
		}
		// A watch's request stays open while its answer streams.
		http.NewResponseController(w).EnableFullDuplex()
		ctx, cancel := context.WithCancel(r.Context())
		r = r.WithContext(ctx)
		p.mu.Lock()
		p.active[r] = cancel
		p.mu.Unlock()
		defer func() {
			p.mu.Lock()
			delete(p.active, r)
			p.mu.Unlock()
			cancel()
		}()
		if d := time.Duration(p.slowEvents.Load()); d > 0 && r.URL.Path == "/v3/watch" {
			w = &slowFirstEvents{ResponseWriter: w, wait: d}
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(func() {
		p.cutOff()
		hs.Close()
	})
	p.url = hs.URL
	return p
}

// slowFirstEvents writes the first bytes holding events late.
type slowFirstEvents struct {
	http.ResponseWriter
	wait time.Duration
	held bool
}

func (s *slowFirstEvents) Write(b []byte) (int, error) {
	if !s.held && bytes.Contains(b, []byte(`"events"`)) {
		s.held = true
		time.Sleep(s.wait) // a slow etcd, not a wait for anything
	}
	return s.ResponseWriter.Write(b)
}

// Flush passes on, so that the proxy sends each message as it comes.
func (s *slowFirstEvents) Flush() { http.NewResponseController(s.ResponseWriter).Flush() }

// cutOff refuses every request from now on, and ends those under way.
func (p *etcdProxy) cutOff() {
	p.cut.Store(true)
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, cancel := range p.active {
		cancel()
	}
}

// TestClusterStartCompacted: etcd compacts its history while a node
// reads its state at start, page by page, and a key of the first page is
// deleted meanwhile: the node reads its state again, at a later
// revision, and starts with exactly etcd's keys.
func TestClusterStartCompacted(t *testing.T) {
	t.Parallel()
	c := startEtcd(t, 1)
	etcd := c.newClient()
	prefix := newPrefix()
	for i := 0; i < 2500; i += 125 {
		var kv []string
		for k := i; k < i+125; k++ {
			kv = append(kv, fmt.Sprintf("%s/s/%04d", prefix, k), strconv.Itoa(k))
		}
		etcdPutAll(t, etcd, kv...)
	}
	p := newEtcdProxy(t, c, 0)
	var once sync.Once
	before := func(body []byte) {
		if bytes.Contains(body, []byte(`"revision"`)) && bytes.Contains(body, []byte(`"limit":"1000"`)) {
			once.Do(func() { // before the second page
				resp, err := etcd.txn(etcdCtx(t), etcdTxn{Success: []etcdOp{{Delete: &etcdDelete{Key: []byte(prefix + "/s/0000")}}}})
				if err == nil {
					err = etcd.compact(etcdCtx(t), resp.Header.Revision)
				}
				if err != nil {
					t.Error(err)
				}
			})
		}
	}
	p.before.Store(&before)
	n := startNode(t, []string{p.url}, prefix)
	var items []listedItem
	json.Unmarshal([]byte(mustDo(t, 200, "GET", n.url+"/s/", "").body), &items)
	if len(items) != 2499 || items[0].Key != "/s/0001" || n.srv.store.Len() != 2499 {
		t.Errorf("the node's keys: %d listed (the first %+v), %d held; want the 2,499 etcd holds, from /s/0001", len(items), items[0], n.srv.store.Len())
	}
}

// TestClusterResync: a node cut off from etcd while the others change
// the keyspace, and etcd compacts its history past where the node's
// watch was: once back, the node reads the prefix again and applies the
// difference as one change. Its streams get every key that changed, its
// view is the others' (an expired key it held is gone too), and a client
// resuming from before the cut gets exactly what changed.
func TestClusterResync(t *testing.T) {
	t.Parallel()
	c := startEtcd(t, 1)
	p := newEtcdProxy(t, c, 0)
	prefix := newPrefix()
	a := startNode(t, []string{p.url}, prefix)
	b := startNode(t, c.endpoints(), prefix)
	mustDo(t, 200, "POST", b.url+"/", `{"ops":[{"op":"set","key":"/r/keep","value":1},{"op":"set","key":"/r/change","value":1},{"op":"set","key":"/r/del","value":1}]}`)
	mustDo(t, 200, "POST", b.url+"/r/ttl", `1`, "X-TTL", "1500ms")
	sse := subscribe(t, a.url, "/r/?initial")
	_, _, synced := untilSynced(t, sse)

	p.cutOff()
	mustDo(t, 200, "POST", b.url+"/r/change", `2`)
	mustDo(t, 200, "DELETE", b.url+"/r/del", "")
	mustDo(t, 200, "POST", b.url+"/r/new", `1`)
	waitFor(t, "/r/ttl to expire", func() bool {
		r, err := c.newClient().rangeKeys(etcdCtx(t), etcdRange{Key: []byte(prefix + "/r/ttl"), CountOnly: true})
		return err == nil && r.Count == 0
	})
	rev := etcdPutAll(t, c.newClient(), "/elsewhere", "1")
	compactAt(t, c, rev)
	p.cut.Store(false)

	// One change, whose events come one after another, in key order.
	want := "/r/change:1=2 /r/del:-1=null /r/new:0=1 /r/ttl:-1=null"
	if got := eventStrings(sseEvents(t, sse, 4)); got != want {
		t.Errorf("the stream on the node cut off: %s; want %s", got, want)
	}
	if la, lb := mustDo(t, 200, "GET", a.url+"/r/", "").body, mustDo(t, 200, "GET", b.url+"/r/", "").body; la != lb {
		t.Errorf("the node cut off lists %s; the other %s", la, lb)
	}
	if a.srv.store.Len() != b.srv.store.Len() {
		t.Errorf("the node cut off holds %d keys, the other %d; want the same", a.srv.store.Len(), b.srv.store.Len())
	}
	ch := subscribe(t, a.url, "/r/", "Last-Event-ID", synced.id)
	if got := stripSeq(eventStrings(sseEvents(t, ch, 5))); got != want+" synced" {
		t.Errorf("resumed on the node cut off from %s: %s; want %s synced", synced.id, got, want)
	}
}

// TestClusterWatchHangs: the member a node's watch is on hangs (as a
// member cut off by a partition: its connections neither answer nor
// close) while the others go on and another node writes. With no request
// to the node, its watchdog finds the watch stalled, watches again
// through another member, and the node is healthy and current.
func TestClusterWatchHangs(t *testing.T) {
	t.Parallel()
	c := startEtcd(t, 3)
	prefix := newPrefix()
	// A follower hangs: the others keep their quorum and their leader.
	follower := (c.leader() + 1) % 3
	eps := c.endpoints()
	others := append(slices.Clone(eps[:follower]), eps[follower+1:]...)
	n := startNode(t, append([]string{eps[follower]}, others...), prefix)
	m := startNode(t, others, prefix)
	hung := c.memberID(follower)
	j := n.srv.cluster
	watchOn := func() uint64 {
		j.mu.Lock()
		defer j.mu.Unlock()
		if j.watch == nil {
			return 0
		}
		return j.watch.header.MemberID
	}
	if watchOn() != hung {
		t.Fatalf("the node watches through member %x; want the first, %x", watchOn(), hung)
	}
	c.pause(follower)
	defer c.resume(follower)
	mustDo(t, 200, "POST", m.url+"/w", `1`)
	waitFor(t, "the node to watch through another member", func() bool { w := watchOn(); return w != 0 && w != hung })
	waitFor(t, "the node healthy", func() bool { return n.health().code == 200 })
	if r := mustDo(t, 200, "GET", n.url+"/w", ""); r.body != "1" {
		t.Errorf("GET /w: %s; want 1", r.body)
	}
}

// TestClusterStartSlow: a node's start-up read of a large prefix takes
// longer than the start's timeout (10 s at least, -write-timeout if
// longer), each page in time: the node starts, with every key. (Here a
// proxy makes etcd slow; a prefix of millions of keys is as slow.)
func TestClusterStartSlow(t *testing.T) {
	t.Parallel()
	c := startEtcd(t, 1)
	etcd := c.newClient()
	prefix := newPrefix()
	const keys = 8000 // 8 pages
	for i := 0; i < keys; i += 125 {
		var kv []string
		for k := i; k < i+125; k++ {
			kv = append(kv, fmt.Sprintf("%s/s/%04d", prefix, k), strconv.Itoa(k))
		}
		etcdPutAll(t, etcd, kv...)
	}
	p := newEtcdProxy(t, c, 0)
	slow := func(body []byte) {
		if bytes.Contains(body, []byte(`"limit":"1000"`)) {
			// A slow page (not a wait for anything): under the client's
			// 2 s for one attempt, 12 s in all.
			time.Sleep(1500 * time.Millisecond)
		}
	}
	p.before.Store(&slow)
	n := startNode(t, []string{p.url}, prefix, "-write-timeout", "3s")
	if got := n.srv.store.Len(); got != keys {
		t.Errorf("the node started with %d keys; want %d", got, keys)
	}
}

// TestClusterLongCatchUp: a node starts on a prefix with a history whose
// first message etcd takes long to send (a large history: 125,000 events
// of 1,000 revisions took 12 s on the test machine). A watch catching up
// brings nothing for a while without being stalled: the node starts,
// rather than close the watch again and again.
func TestClusterLongCatchUp(t *testing.T) {
	t.Parallel()
	c := startEtcd(t, 1)
	prefix := newPrefix()
	for i := range 20 {
		etcdPutAll(t, c.newClient(), fmt.Sprintf("%s/h/%d", prefix, i), "1")
	}
	p := newEtcdProxy(t, c, 0)
	p.slowEvents.Store(int64(5 * time.Second))
	n := startNode(t, []string{p.url}, prefix)
	if got := n.srv.store.Len(); got != 20 {
		t.Errorf("the node started with %d keys; want 20", got)
	}
}
