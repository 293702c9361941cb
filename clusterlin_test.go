package main

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// TestClusterLinearizable: six clients switching at random, for each
// request, between the nodes of a cluster and between HTTP and a
// WebSocket connection to each, reading (GET/get, listings) and writing
// (POST/set, PUT/update, DELETE/delete, transactions with checks) three
// keys: the history of all of them together, checked by linearize_test.go's
// checker against the model of the store, is linearizable. A listing is
// a read of every key at one instant; a write that got no answer may
// have taken effect, or not; every read is answered.
func TestClusterLinearizable(t *testing.T) {
	t.Parallel()
	nodes := startNodes(t, startEtcd(t, 1), 2)
	const clients, each = 6, 70
	// Each client's ways to the cluster: HTTP or its own WebSocket, to
	// either node.
	ways := make([][]linClient, clients)
	for c := range ways {
		for i, n := range nodes {
			p, err := dialPeer(n.url)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { p.ws.Close() })
			ways[c] = append(ways[c], via(fmt.Sprintf(" on node %d by HTTP", i), linHTTP(n.url)),
				via(fmt.Sprintf(" on node %d by WebSocket", i), linWS(p)))
		}
	}
	history := runLinearizable(t, clients, each, func(c int) linClient { return ways[c][rand.IntN(len(ways[c]))] })
	if t.Failed() {
		return
	}
	unanswered := 0
	for _, o := range history {
		switch {
		case o.noAnswer != "" && (o.kind == linGet || o.kind == linList):
			t.Errorf("a read got no answer: %v", o)
		case o.noAnswer != "":
			unanswered++
		}
	}
	for i, n := range nodes {
		j := n.srv.cluster
		t.Logf("node %d: %d rounds of reads, %d fences", i, j.reads.rounds.Load(), j.fences.rounds.Load())
	}
	checkHistory(t, history)
	t.Logf("%d operations linearizable, %d writes without an answer", len(history), unanswered)
}

// via is do, noting in each operation the way it went.
func via(way string, do linClient) linClient {
	return func(o *kvOp) error {
		o.via = way
		return do(o)
	}
}
