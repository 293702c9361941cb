package main

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"net/http/httptest"
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
