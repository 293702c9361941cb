package main

import (
	"fmt"
	"log/slog"
	"net/http/httptest"
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
