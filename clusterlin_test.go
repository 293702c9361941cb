package main

import (
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Linearizability across nodes: clients that send each request to any
// node of a cluster see one key-value store whose operations each take
// effect at one instant between their call and their answer. Checked by
// the Wing & Gong algorithm with Lowe's memoization (as Porcupine does),
// one key at a time (linearizability is local: a history is
// linearizable if each key's is).
//
// (linearize_test.go, on another branch, has a checker of its own; this
// one is named apart until the two are made one.)

// lin2Op is one operation of a history: called at call, answered at ret
// (ns since the history began; math.MaxInt64 for one that got no answer,
// which may take effect at any time after its call, or never: last), and
// what it does, as step says: given the state it takes effect in, whether
// its answer is what that state gives, and the state after.
type lin2Op[S comparable] struct {
	call, ret int64
	step      func(S) (bool, S)
	desc      string
}

// checkLinearizable2 reports whether ops, from init, have a
// linearization: an order of them all, each taking effect between its
// call and its answer, in which each answer is what the state before it
// gives. If not, it returns the longest prefix of such an order it
// found, for the failure message.
func checkLinearizable2[S comparable](init S, ops []lin2Op[S]) (ok bool, longest []int) {
	// The calls and answers in time order (a call before an answer at the
	// same time: they count as overlapping), as a doubly linked list.
	type node struct {
		op         int
		call       bool
		match      *node // a call's answer
		prev, next *node
	}
	type mark struct {
		at    int64
		call  bool
		op    int
		entry *node
	}
	marks := make([]mark, 0, 2*len(ops))
	for i, op := range ops {
		marks = append(marks, mark{op.call, true, i, nil}, mark{op.ret, false, i, nil})
	}
	slices.SortStableFunc(marks, func(a, b mark) int {
		switch {
		case a.at != b.at:
			return cmpInt64(a.at, b.at)
		case a.call != b.call:
			if a.call {
				return -1
			}
			return 1
		}
		return 0
	})
	head := &node{op: -1}
	calls := make([]*node, len(ops))
	prev := head
	for _, m := range marks {
		n := &node{op: m.op, call: m.call, prev: prev}
		prev.next = n
		prev = n
		if m.call {
			calls[m.op] = n
		} else {
			calls[m.op].match = n
		}
	}
	lift := func(n *node) {
		n.prev.next = n.next
		if n.next != nil {
			n.next.prev = n.prev
		}
		m := n.match
		m.prev.next = m.next
		if m.next != nil {
			m.next.prev = m.prev
		}
	}
	unlift := func(n *node) {
		m := n.match
		m.prev.next = m
		if m.next != nil {
			m.next.prev = m
		}
		n.prev.next = n
		if n.next != nil {
			n.next.prev = n
		}
	}
	type frame struct {
		n     *node
		state S
	}
	type seen struct {
		done  string
		state S
	}
	done := make([]byte, (len(ops)+7)/8)
	cache := map[seen]bool{}
	var stack []frame
	state := init
	n := head.next
	for head.next != nil {
		if n.call {
			if ok, next := ops[n.op].step(state); ok {
				done[n.op/8] |= 1 << (n.op % 8)
				key := seen{string(done), next}
				if !cache[key] {
					cache[key] = true
					stack = append(stack, frame{n, state})
					if len(stack) > len(longest) {
						longest = longest[:0]
						for _, f := range stack {
							longest = append(longest, f.n.op)
						}
					}
					state = next
					lift(n)
					n = head.next
					continue
				}
				done[n.op/8] &^= 1 << (n.op % 8)
			}
			n = n.next
			continue
		}
		// An answer before every call still open could take effect:
		// undo the last choice and try the next.
		if len(stack) == 0 {
			return false, longest
		}
		f := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		state = f.state
		done[f.n.op/8] &^= 1 << (f.n.op % 8)
		unlift(f.n)
		n = f.n.next
	}
	return true, nil
}

func cmpInt64(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// kvState is a key as the store holds it: missing, or a value at a
// revision.
type kvState struct {
	present bool
	value   string
	rev     int64
}

// kvRead is a read that answered got (present or not).
func kvRead(got kvState) func(kvState) (bool, kvState) {
	return func(s kvState) (bool, kvState) { return s == got, s }
}

// kvSet is a POST of value that answered rev; unknown: no answer came.
func kvSet(value string, rev int64, unknown bool) func(kvState) (bool, kvState) {
	return func(s kvState) (bool, kvState) {
		next := kvState{true, value, 0}
		if s.present {
			next.rev = s.rev + 1
		}
		return unknown || next.rev == rev, next
	}
}

// kvCAS is a PUT of value with X-Revision rev that succeeded (ok) or
// answered a conflict with cur; unknown: no answer came.
func kvCAS(value string, rev int64, ok, unknown bool, cur kvState) func(kvState) (bool, kvState) {
	return func(s kvState) (bool, kvState) {
		holds := rev == 0 && !s.present || s.present && s.rev == rev-1
		if !holds {
			return !ok && (unknown || s == cur), s
		}
		return ok || unknown, kvState{true, value, rev}
	}
}

// kvDelete is a DELETE that answered whether the key existed.
func kvDelete(existed, unknown bool) func(kvState) (bool, kvState) {
	return func(s kvState) (bool, kvState) { return unknown || s.present == existed, kvState{} }
}

// TestCheckLinearizable2: the checker itself, on histories known to be
// linearizable or not.
func TestCheckLinearizable2(t *testing.T) {
	v := func(value string, rev int64) kvState { return kvState{true, value, rev} }
	op := func(call, ret int64, step func(kvState) (bool, kvState)) lin2Op[kvState] {
		return lin2Op[kvState]{call: call, ret: ret, step: step}
	}
	never := int64(math.MaxInt64)
	for _, tc := range []struct {
		name string
		ops  []lin2Op[kvState]
		want bool
	}{
		{"sequential", []lin2Op[kvState]{op(0, 1, kvSet("1", 0, false)), op(2, 3, kvRead(v("1", 0))), op(4, 5, kvSet("2", 1, false)), op(6, 7, kvRead(v("2", 1)))}, true},
		{"stale read", []lin2Op[kvState]{op(0, 1, kvSet("1", 0, false)), op(2, 3, kvSet("2", 1, false)), op(4, 5, kvRead(v("1", 0)))}, false},
		{"a read during the write sees either", []lin2Op[kvState]{op(0, 10, kvSet("2", 0, false)), op(1, 2, kvRead(kvState{})), op(3, 4, kvRead(v("2", 0)))}, true},
		{"reads going back", []lin2Op[kvState]{op(0, 10, kvSet("2", 0, false)), op(1, 2, kvRead(v("2", 0))), op(3, 4, kvRead(kvState{}))}, false},
		{"a wrong revision", []lin2Op[kvState]{op(0, 1, kvSet("1", 0, false)), op(2, 3, kvSet("2", 0, false))}, false},
		{"concurrent writes, either order", []lin2Op[kvState]{op(0, 5, kvSet("a", 1, false)), op(1, 6, kvSet("b", 0, false)), op(7, 8, kvRead(v("a", 1)))}, true},
		{"a CAS and its conflict", []lin2Op[kvState]{op(0, 1, kvCAS("1", 0, true, false, kvState{})), op(2, 3, kvCAS("2", 0, false, false, v("1", 0))), op(4, 5, kvCAS("3", 1, true, false, kvState{}))}, true},
		{"a conflict that lies", []lin2Op[kvState]{op(0, 1, kvCAS("1", 0, true, false, kvState{})), op(2, 3, kvCAS("2", 1, false, false, v("1", 0)))}, false},
		{"a delete", []lin2Op[kvState]{op(0, 1, kvSet("1", 0, false)), op(2, 3, kvDelete(true, false)), op(4, 5, kvDelete(false, false)), op(6, 7, kvSet("2", 0, false))}, true},
		{"an unknown write that happened", []lin2Op[kvState]{op(0, never, kvSet("5", 0, true)), op(1, 2, kvRead(kvState{})), op(3, 4, kvRead(v("5", 0)))}, true},
		{"an unknown write that did not", []lin2Op[kvState]{op(0, never, kvSet("5", 0, true)), op(1, 2, kvRead(kvState{})), op(3, 4, kvSet("6", 0, false))}, true},
		{"an unknown write undone", []lin2Op[kvState]{op(0, never, kvSet("5", 0, true)), op(1, 2, kvRead(v("5", 0))), op(3, 4, kvRead(kvState{}))}, false},
		{"an unknown write applied twice", []lin2Op[kvState]{op(0, never, kvSet("5", 0, true)), op(1, 2, kvRead(v("5", 1)))}, false},
	} {
		if ok, _ := checkLinearizable2(kvState{}, tc.ops); ok != tc.want {
			t.Errorf("%s: linearizable %v; want %v", tc.name, ok, tc.want)
		}
	}
}

// TestClusterLinearizable: clients that send each request to either node
// of a cluster, at random, writing (POST, PUT with X-Revision, DELETE)
// and reading (GET, listings) a few keys at once: each key's history is
// linearizable. A listing counts as a read of each key at one instant.
func TestClusterLinearizable(t *testing.T) {
	t.Parallel()
	nodes := startNodes(t, startEtcd(t, 1), 2)
	const clients, each = 6, 70
	keys := []string{"/lin/a", "/lin/b", "/lin/c"}
	var mu sync.Mutex
	history := map[string][]lin2Op[kvState]{}
	begin := time.Now()
	record := func(key string, at time.Duration, ret int64, step func(kvState) (bool, kvState), desc string) {
		mu.Lock()
		defer mu.Unlock()
		history[key] = append(history[key], lin2Op[kvState]{int64(at), ret, step, desc})
	}
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lastRev := map[string]int64{}
			for i := range each {
				url := nodes[rand.IntN(len(nodes))].url
				key := keys[rand.IntN(len(keys))]
				value := strconv.Itoa(c*1000 + i)
				at := time.Since(begin)
				var r response
				var err error
				kind := rand.IntN(10)
				switch {
				case kind < 3:
					r, err = call("GET", url+key, "")
				case kind < 4:
					r, err = call("GET", url+"/lin/", "")
				case kind < 6:
					r, err = call("POST", url+key, value)
				case kind < 9:
					rev := lastRev[key] + 1
					if rand.IntN(4) == 0 {
						rev = 0
					}
					r, err = call("PUT", url+key, value, "X-Revision", strconv.FormatInt(rev, 10))
					kind = 100 + int(rev)
				default:
					r, err = call("DELETE", url+key, "")
				}
				ret := int64(time.Since(begin))
				if err == nil && r.code == 503 {
					err = fmt.Errorf("503 %s", r.body)
				}
				if err != nil || r.code >= 500 {
					if kind < 4 {
						errs <- fmt.Errorf("client %d: a read on %s: %v", c, url, err)
						return
					}
					ret = math.MaxInt64 // it may or may not have been applied
				}
				desc := fmt.Sprintf("client %d on %s: %d %s", c, url, r.code, r.body)
				unknown := ret == math.MaxInt64
				switch {
				case kind < 3:
					got := kvState{}
					if r.code == 200 {
						got = kvState{true, r.body, xRevision(r)}
						lastRev[key] = got.rev
					}
					record(key, at, ret, kvRead(got), "GET "+key+" "+desc)
				case kind < 4:
					var items []listedItem
					if err := json.Unmarshal([]byte(r.body), &items); err != nil {
						errs <- fmt.Errorf("client %d: listing: %s", c, r.body)
						return
					}
					listed := map[string]kvState{}
					for _, it := range items {
						listed[it.Key] = kvState{true, string(it.Value), it.Revision}
					}
					for _, k := range keys {
						record(k, at, ret, kvRead(listed[k]), "GET /lin/ "+desc)
					}
				case kind < 6:
					rev := xRevision(r)
					record(key, at, ret, kvSet(value, rev, unknown), "POST "+key+" "+value+" "+desc)
					if !unknown {
						lastRev[key] = rev
					}
				case kind >= 100:
					rev := int64(kind - 100)
					cur := kvState{}
					if r.code == 409 && r.body != "null" {
						cur = kvState{true, r.body, xRevision(r)}
					}
					record(key, at, ret, kvCAS(value, rev, r.code == 200, unknown, cur), fmt.Sprintf("PUT %s %s X-Revision %d %s", key, value, rev, desc))
					switch {
					case r.code == 200:
						lastRev[key] = rev
					case cur.present:
						lastRev[key] = cur.rev
					}
				default:
					record(key, at, ret, kvDelete(strings.Contains(r.body, "true"), unknown), "DELETE "+key+" "+desc)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for i, n := range nodes {
		j := n.srv.cluster
		t.Logf("node %d: %d rounds of reads, %d fences", i, j.reads.rounds.Load(), j.fences.rounds.Load())
	}
	for _, key := range keys {
		ops := history[key]
		ok, longest := checkLinearizable2(kvState{}, ops)
		if !ok {
			var lines []string
			for _, i := range longest {
				lines = append(lines, ops[i].desc)
			}
			t.Errorf("the history of %s (%d operations) is not linearizable; the longest linearizable prefix found:\n%s",
				key, len(ops), strings.Join(lines, "\n"))
		}
		t.Logf("%s: %d operations", key, len(ops))
	}
}
