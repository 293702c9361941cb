package main

// Linearizability: a history of concurrent operations, each with the
// times it was sent and answered, is checked against a sequential model
// by the search of Wing & Gong with Lowe's memoization (as porcupine
// does): some order of the operations, each taking effect at one moment
// between its call and its answer, must give every answer the server
// gave. One checker, checkLinearizable, over any model, serves every
// test: a server alone (TestLinearizable) and a cluster whose clients
// switch nodes (TestClusterLinearizable). The model here is the store's:
// a few keys; reads, listings, sets, compares-and-swaps, deletes and
// transactions with checks; and operations that got no answer (an
// error, a 5xx), which may have taken effect at any time after their
// call, or never.

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// linNever is the answer time of an operation that got no answer: it may
// take effect at any time after its call, or never (last: nothing after
// it sees it).
const linNever = math.MaxInt64

// A linOp is one operation of a history over states S: called at call,
// answered at ret (ns since the history began, or linNever), and step:
// given the state it takes effect in, whether its answer is what that
// state gives, and the state after. desc names it in a failure.
type linOp[S comparable] struct {
	call, ret int64
	step      func(S) (bool, S)
	desc      string
}

// checkLinearizable reports whether ops, from init, have a
// linearization: an order of them all, each taking effect between its
// call and its answer, in which each answer is what the state before it
// gives. If not, it returns the longest prefix of such an order it
// found (indexes of ops), for the failure message.
func checkLinearizable[S comparable](init S, ops []linOp[S]) (ok bool, longest []int) {
	// The calls and answers in time order (a call before an answer at the
	// same time: they count as overlapping), as a doubly linked list.
	type node struct {
		op         int
		call       bool
		match      *node // a call's answer
		prev, next *node
	}
	type mark struct {
		at   int64
		call bool
		op   int
	}
	marks := make([]mark, 0, 2*len(ops))
	for i, op := range ops {
		marks = append(marks, mark{op.call, true, i}, mark{op.ret, false, i})
	}
	slices.SortStableFunc(marks, func(a, b mark) int {
		switch {
		case a.at < b.at || a.at == b.at && a.call && !b.call:
			return -1
		case a.at > b.at || a.at == b.at && !a.call && b.call:
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
	// Lowe's memoization: the (operations taken, state) pairs already
	// tried, which lead nowhere the second time either.
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
		// An answer before which no call still open could take effect:
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

// linKeys is how many keys the model holds: /lin/0 … /lin/2.
const linKeys = 3

func linKey(k int) string { return "/lin/" + strconv.Itoa(k) }

// linVal is a key's version in the model, or its absence.
type linVal struct {
	present bool
	value   int64
	rev     int64
}

func (v linVal) String() string {
	if !v.present {
		return "missing"
	}
	return fmt.Sprintf("%d@%d", v.value, v.rev)
}

// linState is the model: every key's version. It is comparable, so that
// the search remembers the states it has been in.
type linState [linKeys]linVal

type linKind uint8

const (
	linGet linKind = iota
	linList
	linSet
	linCAS // PUT: rev is the revision the write will have
	linDelete
	linTxn
)

// linCheck and linWrite are a transaction's checks and ops.
type linCheck struct {
	key int
	rev int64 // -1: missing
}

type linWrite struct {
	key   int
	del   bool
	value int64
}

// kvOp is one operation on the store: what was asked, what was
// answered, and when.
type kvOp struct {
	client    int
	kind      linKind
	key       int
	value     int64
	rev       int64 // CAS: the revision the write will have
	checks    []linCheck
	writes    []linWrite
	call, ret int64  // ns since the history began
	via       string // the node or connection it went through, for a failure's message

	// The answer.
	noAnswer  string   // why none came ("": one did): a write may or may not have taken effect, a read tells nothing
	ok        bool     // a CAS or a transaction applied
	read      linVal   // a get's version; a CAS conflict's current version
	listed    linState // a listing's keys
	newRev    int64    // a set's or an applied CAS's revision
	revs      []int64  // an applied transaction's revision of each op (-1: a delete)
	conflicts []linVal // a transaction's conflicts, one per failed check in order
	existed   int8     // a delete: 1 or 0; -1: not told (the WebSocket)
}

func (o kvOp) String() string {
	var in, out string
	switch o.kind {
	case linGet:
		in, out = fmt.Sprintf("get %d", o.key), o.read.String()
	case linList:
		in, out = "list", fmt.Sprint(o.listed)
	case linSet:
		in, out = fmt.Sprintf("set %d=%d", o.key, o.value), fmt.Sprintf("rev %d", o.newRev)
	case linCAS:
		in = fmt.Sprintf("cas %d=%d rev %d", o.key, o.value, o.rev)
		out = fmt.Sprintf("ok rev %d", o.newRev)
		if !o.ok {
			out = "conflict " + o.read.String()
		}
	case linDelete:
		in, out = fmt.Sprintf("delete %d", o.key), fmt.Sprintf("existed %d", o.existed)
	case linTxn:
		in = fmt.Sprintf("txn check %v ops %v", o.checks, o.writes)
		out = fmt.Sprintf("ok %v", o.revs)
		if !o.ok {
			out = fmt.Sprintf("conflict %v", o.conflicts)
		}
	}
	if o.noAnswer != "" {
		out = "no answer: " + o.noAnswer
	}
	return fmt.Sprintf("client %d%s [%d, %d] %s -> %s", o.client, o.via, o.call, o.ret, in, out)
}

// lin is o as an operation of the checker.
func (o kvOp) lin() linOp[linState] {
	ret := o.ret
	if o.noAnswer != "" {
		ret = linNever
	}
	return linOp[linState]{o.call, ret, o.step, o.String()}
}

// step applies o to s as the model does, and reports whether o's answer
// is the one the model gives; any is, for one that got no answer.
func (o kvOp) step(s linState) (bool, linState) {
	lost := o.noAnswer != ""
	next := func(v linVal) int64 {
		if v.present {
			return v.rev + 1
		}
		return 0
	}
	switch o.kind {
	case linGet:
		return lost || s[o.key] == o.read, s
	case linList:
		return lost || s == o.listed, s
	case linSet:
		rev := next(s[o.key])
		s[o.key] = linVal{true, o.value, rev}
		return lost || o.newRev == rev, s
	case linCAS:
		cur := s[o.key]
		if next(cur) != o.rev {
			return lost || !o.ok && o.read == cur, s
		}
		s[o.key] = linVal{true, o.value, o.rev}
		return lost || o.ok && o.newRev == o.rev, s
	case linDelete:
		existed := s[o.key].present
		s[o.key] = linVal{}
		return lost || o.existed < 0 || (o.existed == 1) == existed, s
	}
	var failed []linVal
	for _, c := range o.checks {
		cur := s[c.key]
		rev := int64(-1)
		if cur.present {
			rev = cur.rev
		}
		if rev != c.rev {
			failed = append(failed, cur)
		}
	}
	if failed != nil {
		return lost || !o.ok && slices.Equal(failed, o.conflicts), s
	}
	revs := make([]int64, len(o.writes))
	for i, w := range o.writes {
		revs[i] = -1
		if w.del {
			s[w.key] = linVal{}
		} else {
			revs[i] = next(s[w.key])
			s[w.key] = linVal{true, w.value, revs[i]}
		}
	}
	return lost || o.ok && slices.Equal(revs, o.revs), s
}

// checkHistory fails t unless history is linearizable from the empty
// store, showing the longest linearizable prefix found; and unless the
// checker rejects it once a read's answer is changed to a value never
// written (so that it is not vacuous on this history).
func checkHistory(t *testing.T, history []kvOp) {
	t.Helper()
	ops := make([]linOp[linState], len(history))
	for i, o := range history {
		ops[i] = o.lin()
	}
	if ok, longest := checkLinearizable(linState{}, ops); !ok {
		var lines []string
		for _, i := range longest {
			lines = append(lines, ops[i].desc)
		}
		var rest []string
		for i, op := range ops {
			if !slices.Contains(longest, i) {
				rest = append(rest, op.desc)
			}
		}
		t.Fatalf("a history of %d operations is not linearizable; the longest linearizable order found:\n%s\nand the operations it could not place:\n%s",
			len(ops), strings.Join(lines, "\n"), strings.Join(rest, "\n"))
	}
	for i, o := range history {
		if o.kind == linGet && o.noAnswer == "" {
			o.read = linVal{true, -7, 0}
			ops[i] = o.lin()
			if ok, _ := checkLinearizable(linState{}, ops); ok {
				t.Errorf("the history with %v is linearizable: the checker accepts anything", o)
			}
			return
		}
	}
}

// TestCheckLinearizable: the checker accepts histories some order
// explains, concurrent ones and ones with writes that got no answer
// included, and rejects known violations: a stale read, reads going
// back, a wrong revision, a lying conflict, two compares-and-swaps of
// one revision both applied, a transaction or a listing seen in part, a
// write that got no answer seen undone or applied twice.
func TestCheckLinearizable(t *testing.T) {
	v := func(value, rev int64) linVal { return linVal{true, value, rev} }
	none := linVal{}
	get := func(call, ret int64, key int, read linVal) kvOp {
		return kvOp{kind: linGet, key: key, read: read, call: call, ret: ret}
	}
	list := func(call, ret int64, listed ...linVal) kvOp {
		o := kvOp{kind: linList, call: call, ret: ret}
		copy(o.listed[:], listed)
		return o
	}
	set := func(call, ret int64, key int, value, rev int64) kvOp {
		return kvOp{kind: linSet, key: key, value: value, newRev: rev, call: call, ret: ret}
	}
	cas := func(call, ret int64, key int, value, rev int64, ok bool, cur linVal) kvOp {
		o := kvOp{kind: linCAS, key: key, value: value, rev: rev, ok: ok, read: cur, call: call, ret: ret}
		if ok {
			o.newRev = rev
		}
		return o
	}
	del := func(call, ret int64, key int, existed bool) kvOp {
		o := kvOp{kind: linDelete, key: key, call: call, ret: ret}
		if existed {
			o.existed = 1
		}
		return o
	}
	lost := func(o kvOp) kvOp {
		o.noAnswer = "503"
		return o
	}
	txnAB := kvOp{kind: linTxn, writes: []linWrite{{key: 0, value: 1}, {key: 1, value: 1}}, ok: true, revs: []int64{0, 0}, call: 0, ret: 100}
	for _, tt := range []struct {
		name    string
		history []kvOp
		want    bool
	}{
		{"sequential", []kvOp{set(0, 1, 0, 1, 0), get(2, 3, 0, v(1, 0)), set(4, 5, 0, 2, 1), get(6, 7, 0, v(2, 1))}, true},
		{"a read overlapping the write sees it", []kvOp{set(0, 10, 0, 5, 0), get(5, 8, 0, v(5, 0))}, true},
		{"a read overlapping the write misses it", []kvOp{set(0, 10, 0, 5, 0), get(5, 8, 0, none)}, true},
		{"a read after the write returned misses it", []kvOp{set(0, 10, 0, 5, 0), get(20, 30, 0, none)}, false},
		{"a stale read after a newer one", []kvOp{set(0, 10, 0, 5, 0), set(20, 100, 0, 6, 1), get(30, 40, 0, v(6, 1)), get(50, 60, 0, v(5, 0))}, false},
		{"reads going back during a write", []kvOp{set(0, 10, 0, 2, 0), get(1, 2, 0, v(2, 0)), get(3, 4, 0, none)}, false},
		{"a wrong revision", []kvOp{set(0, 1, 0, 1, 0), set(2, 3, 0, 2, 0)}, false},
		{"concurrent writes, either order", []kvOp{set(0, 5, 0, 1, 1), set(1, 6, 0, 2, 0), get(7, 8, 0, v(1, 1))}, true},
		{"a CAS and its conflict", []kvOp{cas(0, 1, 0, 1, 0, true, none), cas(2, 3, 0, 2, 0, false, v(1, 0)), cas(4, 5, 0, 3, 1, true, none)}, true},
		{"a conflict that lies", []kvOp{cas(0, 1, 0, 1, 0, true, none), cas(2, 3, 0, 2, 1, false, v(1, 0))}, false},
		{"two CAS to the same revision both applied", []kvOp{set(0, 10, 0, 5, 0), cas(20, 30, 0, 7, 1, true, none), cas(25, 40, 0, 8, 1, true, none)}, false},
		{"deletes", []kvOp{set(0, 1, 0, 1, 0), del(2, 3, 0, true), del(4, 5, 0, false), set(6, 7, 0, 2, 0)}, true},
		{"a delete of a missing key that says it existed", []kvOp{del(0, 1, 0, true)}, false},
		{"a transaction read whole", []kvOp{txnAB, get(10, 20, 0, v(1, 0)), get(30, 40, 1, v(1, 0))}, true},
		{"a transaction read before, then after", []kvOp{txnAB, get(10, 20, 0, none), get(30, 40, 1, v(1, 0))}, true},
		{"a transaction read in part", []kvOp{txnAB, get(10, 20, 0, v(1, 0)), get(30, 40, 1, none)}, false},
		{"a transaction listed whole", []kvOp{txnAB, list(10, 20, v(1, 0), v(1, 0))}, true},
		{"a transaction listed in part", []kvOp{txnAB, list(10, 20, v(1, 0), none)}, false},
		{"a listing after a write returned misses it", []kvOp{set(0, 10, 2, 5, 0), list(20, 30)}, false},
		{"a check that held on a version never there", []kvOp{
			set(0, 10, 0, 5, 0),
			{kind: linTxn, checks: []linCheck{{0, 1}}, writes: []linWrite{{key: 1, value: 2}}, ok: true, revs: []int64{0}, call: 20, ret: 30},
		}, false},
		{"a conflict that shows the current version", []kvOp{
			set(0, 10, 0, 5, 0),
			{kind: linTxn, checks: []linCheck{{0, -1}, {1, -1}}, writes: []linWrite{{key: 1, value: 2}}, conflicts: []linVal{v(5, 0)}, call: 20, ret: 30},
		}, true},
		{"a write without an answer that happened", []kvOp{lost(set(0, 1, 0, 5, 0)), get(1, 2, 0, none), get(3, 4, 0, v(5, 0))}, true},
		{"a write without an answer that did not", []kvOp{lost(set(0, 1, 0, 5, 0)), get(1, 2, 0, none), set(3, 4, 0, 6, 0)}, true},
		{"a write without an answer undone", []kvOp{lost(set(0, 1, 0, 5, 0)), get(1, 2, 0, v(5, 0)), get(3, 4, 0, none)}, false},
		{"a write without an answer applied twice", []kvOp{lost(set(0, 1, 0, 5, 0)), get(1, 2, 0, v(5, 1))}, false},
		{"a transaction without an answer seen whole", []kvOp{lost(txnAB), get(200, 300, 1, v(1, 0)), list(400, 500, v(1, 0), v(1, 0))}, true},
		{"a transaction without an answer seen in part", []kvOp{lost(txnAB), list(200, 300, v(1, 0), none)}, false},
		{"a read without an answer tells nothing", []kvOp{set(0, 1, 0, 5, 0), lost(get(2, 3, 0, v(9, 9)))}, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ops := make([]linOp[linState], len(tt.history))
			for i, o := range tt.history {
				ops[i] = o.lin()
			}
			ok, longest := checkLinearizable(linState{}, ops)
			if ok != tt.want {
				t.Errorf("linearizable: %v; want %v", ok, tt.want)
			}
			if !ok && len(longest) >= len(ops) {
				t.Errorf("the longest order found has %d operations of %d, and is not a linearization", len(longest), len(ops))
			}
		})
	}
}

// linClient is one client's way of doing an operation: over HTTP or a
// WebSocket. It fills in o's answer, or why none came (noAnswer: the
// request failed, or the server answered 5xx or error); an error is an
// answer the model cannot read.
type linClient func(o *kvOp) error

// linHTTP does operations over HTTP, at url.
func linHTTP(url string) linClient {
	return func(o *kvOp) error {
		var method, path, body string
		var headers []string
		key := linKey(o.key)
		switch o.kind {
		case linGet:
			method, path = "GET", key
		case linList:
			method, path = "GET", "/lin/"
		case linSet:
			method, path, body = "POST", key, strconv.FormatInt(o.value, 10)
		case linCAS:
			method, path, body = "PUT", key, strconv.FormatInt(o.value, 10)
			headers = []string{"X-Revision", strconv.FormatInt(o.rev, 10)}
		case linDelete:
			method, path = "DELETE", key
		case linTxn:
			method, path, body = "POST", "/", linTxnBody(o)
		}
		req, err := http.NewRequest(method, url+path, strings.NewReader(body))
		if err != nil {
			return err
		}
		for i := 0; i+1 < len(headers); i += 2 {
			req.Header.Set(headers[i], headers[i+1])
		}
		resp, err := client.Do(req)
		if err != nil {
			o.noAnswer = err.Error()
			return nil
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			o.noAnswer = err.Error()
			return nil
		}
		if resp.StatusCode >= 500 {
			o.noAnswer = fmt.Sprintf("%d %s", resp.StatusCode, b)
			return nil
		}
		rev, _ := strconv.ParseInt(resp.Header.Get("X-Revision"), 10, 64)
		bad := func() error { return fmt.Errorf("%s %s %s: %d %s", method, path, body, resp.StatusCode, b) }
		switch {
		case o.kind == linGet && resp.StatusCode == 404:
			o.read = linVal{}
		case o.kind == linGet && resp.StatusCode == 200:
			o.read, err = linValOf(b, rev)
		case o.kind == linList && resp.StatusCode == 200:
			o.listed, err = linListed(b)
		case o.kind == linSet && resp.StatusCode == 200:
			o.newRev = rev
		case o.kind == linCAS && resp.StatusCode == 200:
			o.ok, o.newRev = true, rev
		case o.kind == linCAS && resp.StatusCode == 409:
			o.read, err = linValOf(b, rev)
		case o.kind == linDelete && resp.StatusCode == 200:
			var d struct{ Deleted bool }
			err = json.Unmarshal(b, &d)
			o.existed = 0
			if d.Deleted {
				o.existed = 1
			}
		case o.kind == linTxn && (resp.StatusCode == 200 || resp.StatusCode == 409):
			err = linTxnAnswer(o, resp.StatusCode == 200, b)
		default:
			return bad()
		}
		if err != nil {
			return fmt.Errorf("%v: %v", bad(), err)
		}
		return nil
	}
}

// linValOf reads a value (a JSON integer, or null for a missing key) at
// revision rev.
func linValOf(b []byte, rev int64) (linVal, error) {
	if string(b) == "null" || rev < 0 {
		return linVal{}, nil
	}
	v, err := strconv.ParseInt(string(b), 10, 64)
	return linVal{true, v, rev}, err
}

// linListed reads a listing of /lin/ (HTTP's body, the WebSocket's
// values payload).
func linListed(b []byte) (linState, error) {
	var items []struct {
		Key      string
		Value    json.RawMessage
		Revision int64
	}
	var s linState
	if err := json.Unmarshal(b, &items); err != nil {
		return s, err
	}
	for _, it := range items {
		k, err := strconv.Atoi(strings.TrimPrefix(it.Key, "/lin/"))
		if err != nil || k < 0 || k >= linKeys || linKey(k) != it.Key {
			return s, fmt.Errorf("listed %q: not a key of the model", it.Key)
		}
		if s[k], err = linValOf(it.Value, it.Revision); err != nil {
			return s, err
		}
	}
	return s, nil
}

// linTxnBody is a transaction's body (and the txn message's payload).
func linTxnBody(o *kvOp) string {
	var checks, ops []string
	for _, c := range o.checks {
		checks = append(checks, fmt.Sprintf(`{"key":%q,"revision":%d}`, linKey(c.key), c.rev))
	}
	for _, w := range o.writes {
		if w.del {
			ops = append(ops, fmt.Sprintf(`{"op":"delete","key":%q}`, linKey(w.key)))
		} else {
			ops = append(ops, fmt.Sprintf(`{"op":"set","key":%q,"value":%d}`, linKey(w.key), w.value))
		}
	}
	return `{"check":[` + strings.Join(checks, ",") + `],"ops":[` + strings.Join(ops, ",") + `]}`
}

// linTxnAnswer reads a transaction's answer: {seq, revisions} if it
// applied, else {conflicts} (HTTP's 409 body, or the WebSocket's
// conflict payload).
func linTxnAnswer(o *kvOp, applied bool, b []byte) error {
	_, err := readTxnAnswer(o, applied, b, linKey)
	return err
}

// readTxnAnswer is linTxnAnswer for a model whose key k is named key(k), and
// returns the transaction's seq if it applied.
func readTxnAnswer(o *kvOp, applied bool, b []byte, key func(int) string) (seq int64, err error) {
	var a struct {
		Seq       int64
		Revisions map[string]int64
		Conflicts []struct {
			Key      string
			Value    json.RawMessage
			Revision int64
		}
	}
	if err := json.Unmarshal(b, &a); err != nil {
		return 0, err
	}
	o.ok = applied
	if applied {
		if len(a.Revisions) != len(o.writes) {
			return 0, fmt.Errorf("revisions of %d keys; want %d", len(a.Revisions), len(o.writes))
		}
		for _, w := range o.writes {
			rev, ok := a.Revisions[key(w.key)]
			if !ok {
				return 0, fmt.Errorf("no revision of %s", key(w.key))
			}
			o.revs = append(o.revs, rev)
		}
		return a.Seq, nil
	}
	if len(a.Conflicts) == 0 {
		return 0, fmt.Errorf("a conflict without conflicts")
	}
	for _, c := range a.Conflicts {
		v, err := linValOf(c.Value, c.Revision)
		if err != nil {
			return 0, err
		}
		o.conflicts = append(o.conflicts, v)
	}
	return 0, nil
}

// linWS does operations over the WebSocket connection p.
func linWS(p *wsPeer) linClient {
	return func(o *kvOp) error {
		key := linKey(o.key)
		var typ, payload string
		switch o.kind {
		case linGet:
			typ, payload = "get", fmt.Sprintf(`{"key":%q}`, key)
		case linList:
			typ, payload = "list", `{"prefix":"/lin/"}`
		case linSet:
			typ, payload = "set", fmt.Sprintf(`{"key":%q,"value":%d}`, key, o.value)
		case linCAS:
			typ, payload = "update", fmt.Sprintf(`{"key":%q,"value":%d,"revision":%d}`, key, o.value, o.rev)
		case linDelete:
			typ, payload = "delete", fmt.Sprintf(`{"key":%q}`, key)
		case linTxn:
			typ, payload = "txn", linTxnBody(o)
		}
		m, err := p.request(typ, payload)
		if err != nil {
			return err // the connection is gone: so is the client
		}
		var ev struct {
			Value    json.RawMessage
			Revision int64
		}
		json.Unmarshal(m.Payload, &ev)
		switch {
		case m.Type == "error":
			o.noAnswer = string(m.Payload)
		case o.kind == linGet && m.Type == "no-value":
			o.read = linVal{}
		case o.kind == linGet && m.Type == "value":
			o.read, err = linValOf(ev.Value, ev.Revision)
		case o.kind == linList && m.Type == "values":
			o.listed, err = linListed(m.Payload)
		case o.kind == linSet && m.Type == "ok":
			o.newRev = ev.Revision
		case o.kind == linCAS && m.Type == "ok":
			o.ok, o.newRev = true, ev.Revision
		case o.kind == linCAS && m.Type == "conflict":
			o.read, err = linValOf(ev.Value, ev.Revision)
		case o.kind == linDelete && m.Type == "ok":
			o.existed = -1 // the WebSocket does not say
		case o.kind == linTxn && (m.Type == "ok" || m.Type == "conflict"):
			err = linTxnAnswer(o, m.Type == "ok", m.Payload)
		default:
			return fmt.Errorf("%s %s: %s", typ, payload, m.raw)
		}
		if err != nil {
			return fmt.Errorf("%s %s: %s: %v", typ, payload, m.raw, err)
		}
		return nil
	}
}

// linWorkload returns the next random operation of a client, which
// checks and compares-and-swaps against the revisions it last saw, so
// that some hold and some fail.
type linWorkload struct {
	rnd    *rand.Rand
	client int
	n      int64
	seen   [linKeys]int64 // the last revision seen of each key; -1: missing
}

func newLinWorkload(client int) *linWorkload {
	w := &linWorkload{rnd: rand.New(rand.NewPCG(uint64(client), uint64(time.Now().UnixNano()))), client: client}
	for k := range w.seen {
		w.seen[k] = -1
	}
	return w
}

func (w *linWorkload) next() kvOp {
	w.n++
	o := kvOp{client: w.client, key: w.rnd.IntN(linKeys), value: int64(w.client)*1000 + w.n}
	switch r := w.rnd.IntN(10); {
	case r < 2:
		o.kind = linGet
	case r < 3:
		o.kind = linList
	case r < 4:
		o.kind = linSet
	case r < 6:
		o.kind = linCAS
		o.rev = w.seen[o.key] + 1
	case r < 7:
		o.kind = linDelete
	default:
		o.kind = linTxn
		keys := w.rnd.Perm(linKeys)
		for _, k := range keys[:w.rnd.IntN(3)] {
			o.checks = append(o.checks, linCheck{k, w.seen[k]})
		}
		for i, k := range keys[:1+w.rnd.IntN(linKeys)] {
			o.writes = append(o.writes, linWrite{key: k, del: w.rnd.IntN(4) == 0, value: o.value*10 + int64(i)})
		}
	}
	return o
}

// saw notes the revisions an answer shows.
func (w *linWorkload) saw(o *kvOp) {
	rev := func(v linVal) int64 {
		if v.present {
			return v.rev
		}
		return -1
	}
	switch {
	case o.noAnswer != "":
	case o.kind == linGet || o.kind == linCAS && !o.ok:
		w.seen[o.key] = rev(o.read)
	case o.kind == linList:
		for k, v := range o.listed {
			w.seen[k] = rev(v)
		}
	case o.kind == linSet || o.kind == linCAS:
		w.seen[o.key] = o.newRev
	case o.kind == linDelete:
		w.seen[o.key] = -1
	case o.kind == linTxn && o.ok:
		for i, wr := range o.writes {
			w.seen[wr.key] = o.revs[i]
		}
	}
}

// runLinearizable runs clients concurrently, each doing n operations of
// its own workload, each through the client pick returns for it (its
// connection, or any node), and returns the history.
func runLinearizable(t *testing.T, clients, n int, pick func(client int) linClient) []kvOp {
	t.Helper()
	start := time.Now()
	histories := make([][]kvOp, clients)
	var wg sync.WaitGroup
	for c := range histories {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w := newLinWorkload(c)
			for range n {
				o := w.next()
				do := pick(c)
				o.call = int64(time.Since(start))
				if err := do(&o); err != nil {
					t.Error(err)
					return
				}
				o.ret = int64(time.Since(start))
				w.saw(&o)
				histories[c] = append(histories[c], o)
			}
		}()
	}
	wg.Wait()
	return slices.Concat(histories...)
}

// TestLinearizable: four clients, two over HTTP and two over WebSocket
// connections, each do 50 random operations on three keys of an
// in-process server: GET/get, listings, POST/set, PUT/update
// (compare-and-swap), DELETE/delete and transactions with checks
// (applied or in conflict). Every operation is answered, and the history
// is linearizable (and not once a read is changed: checkHistory). In
// memory and with -data.
func TestLinearizable(t *testing.T) {
	t.Run("memory", func(t *testing.T) { linearizableServer(t) })
	t.Run("data", func(t *testing.T) { linearizableServer(t, "-data", t.TempDir()) })
}

func linearizableServer(t *testing.T, args ...string) {
	_, url := newTestServer(t, args...)
	clients := make([]linClient, 4)
	for c := range clients {
		clients[c] = linHTTP(url)
		if c >= 2 {
			p, err := dialPeer(url)
			if err != nil {
				t.Fatal(err)
			}
			defer p.ws.Close()
			clients[c] = linWS(p)
		}
	}
	history := runLinearizable(t, len(clients), 50, func(c int) linClient { return clients[c] })
	if t.Failed() {
		return
	}
	conflicts, applied := 0, 0
	for _, o := range history {
		switch {
		case o.noAnswer != "":
			t.Errorf("a server alone answers every request: %v", o)
		case o.kind == linTxn && o.ok:
			applied++
		case o.kind == linTxn:
			conflicts++
		}
	}
	checkHistory(t, history)
	t.Logf("%d operations linearizable; transactions: %d applied, %d in conflict", len(history), applied, conflicts)
}
