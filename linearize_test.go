package main

// Linearizability of single writes and transactions together: a
// history of concurrent operations, each with the times it was sent and
// answered, is checked against a sequential model of a few keys by the
// Wing & Gong search with Lowe's memoization (as porcupine does): some
// order of the operations, each taking effect at one moment between its
// call and its return, must give every answer the server gave.

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
)

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

// linOp is one operation of a history: what was asked, what was
// answered, and when.
type linOp struct {
	client        int
	kind          linKind
	key           int
	value         int64
	rev           int64 // CAS: the revision the write will have
	checks        []linCheck
	writes        []linWrite
	call, return_ int64 // ns since the start

	// The answer.
	ok        bool     // a CAS or a transaction applied
	read      linVal   // a get's version; a CAS conflict's current version
	newRev    int64    // a set's or an applied CAS's revision
	revs      []int64  // an applied transaction's revision of each op (-1: a delete)
	conflicts []linVal // a transaction's conflicts, one per failed check in order
	existed   int8     // a delete: 1 or 0; -1: not told (the WebSocket)
}

func (o linOp) String() string {
	var in, out string
	switch o.kind {
	case linGet:
		in, out = fmt.Sprintf("get %d", o.key), o.read.String()
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
	return fmt.Sprintf("client %d [%d, %d] %s -> %s", o.client, o.call, o.return_, in, out)
}

// step applies o to s as the model does, and reports whether o's answer
// is the one the model gives.
func (o *linOp) step(s linState) (linState, bool) {
	next := func(v linVal) int64 {
		if v.present {
			return v.rev + 1
		}
		return 0
	}
	switch o.kind {
	case linGet:
		return s, s[o.key] == o.read
	case linSet:
		rev := next(s[o.key])
		s[o.key] = linVal{true, o.value, rev}
		return s, o.newRev == rev
	case linCAS:
		cur := s[o.key]
		if next(cur) != o.rev {
			return s, !o.ok && o.read == cur
		}
		s[o.key] = linVal{true, o.value, o.rev}
		return s, o.ok && o.newRev == o.rev
	case linDelete:
		existed := s[o.key].present
		s[o.key] = linVal{}
		return s, o.existed < 0 || (o.existed == 1) == existed
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
		if o.ok || len(failed) != len(o.conflicts) {
			return s, false
		}
		for i := range failed {
			if failed[i] != o.conflicts[i] {
				return s, false
			}
		}
		return s, true
	}
	if !o.ok {
		return s, false
	}
	for i, w := range o.writes {
		want := int64(-1)
		if w.del {
			s[w.key] = linVal{}
		} else {
			want = next(s[w.key])
			s[w.key] = linVal{true, w.value, want}
		}
		if o.revs[i] != want {
			return s, false
		}
	}
	return s, true
}

// linEntry is a call or a return of an operation, in a list ordered by
// time.
type linEntry struct {
	op         int
	call       bool
	time       int64
	match      *linEntry // a call's return
	prev, next *linEntry
}

// linearizable reports whether history is linearizable from the empty
// state: the search of Wing & Gong, improved by Lowe (a cache of the
// (operations taken, state) pairs already tried), as porcupine runs it.
// Entries are ordered by time, a call before a return at the same time
// (such operations overlap).
func linearizable(history []linOp) bool {
	var entries []*linEntry
	for i, o := range history {
		call := &linEntry{op: i, call: true, time: o.call}
		ret := &linEntry{op: i, time: o.return_}
		call.match = ret
		entries = append(entries, call, ret)
	}
	sortEntries(entries)
	head := &linEntry{}
	prev := head
	for _, e := range entries {
		prev.next, e.prev = e, prev
		prev = e
	}
	lift := func(e *linEntry) {
		e.prev.next = e.next
		if e.next != nil {
			e.next.prev = e.prev
		}
		m := e.match
		m.prev.next = m.next
		if m.next != nil {
			m.next.prev = m.prev
		}
	}
	unlift := func(e *linEntry) {
		m := e.match
		m.prev.next = m
		if m.next != nil {
			m.next.prev = m
		}
		e.prev.next = e
		if e.next != nil {
			e.next.prev = e
		}
	}
	type frame struct {
		e     *linEntry
		state linState
	}
	type cacheKey struct {
		taken string
		state linState
	}
	taken := make([]uint64, (len(history)+63)/64)
	bits := func() string {
		b := make([]byte, 0, 8*len(taken))
		for _, w := range taken {
			b = append(b, byte(w), byte(w>>8), byte(w>>16), byte(w>>24), byte(w>>32), byte(w>>40), byte(w>>48), byte(w>>56))
		}
		return string(b)
	}
	cache := map[cacheKey]bool{}
	var stack []frame
	var state linState
	e := head.next
	for head.next != nil {
		if e.call {
			if next, ok := history[e.op].step(state); ok {
				taken[e.op/64] |= 1 << (e.op % 64)
				k := cacheKey{bits(), next}
				if !cache[k] {
					cache[k] = true
					stack = append(stack, frame{e, state})
					state = next
					lift(e)
					e = head.next
					continue
				}
				taken[e.op/64] &^= 1 << (e.op % 64)
			}
			e = e.next
			continue
		}
		// A return whose call could not be placed: undo the last choice.
		if len(stack) == 0 {
			return false
		}
		f := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		state = f.state
		taken[f.e.op/64] &^= 1 << (f.e.op % 64)
		unlift(f.e)
		e = f.e.next
	}
	return true
}

// sortEntries orders entries by time, a call before a return at the
// same time.
func sortEntries(entries []*linEntry) {
	less := func(a, b *linEntry) bool {
		if a.time != b.time {
			return a.time < b.time
		}
		return a.call && !b.call
	}
	for i := 1; i < len(entries); i++ { // insertion sort: histories are small and nearly sorted
		for j := i; j > 0 && less(entries[j], entries[j-1]); j-- {
			entries[j], entries[j-1] = entries[j-1], entries[j]
		}
	}
}

// TestLinearizableChecker: the checker accepts histories some order
// explains, concurrent ones included, and rejects known violations: a
// read of a key after its write returned that misses it; a stale read
// after a newer one; and a transaction seen in part (one key read
// changed, the other read later unchanged).
func TestLinearizableChecker(t *testing.T) {
	v := func(value, rev int64) linVal { return linVal{true, value, rev} }
	set := func(c int, call, ret int64, key int, value, rev int64) linOp {
		return linOp{client: c, kind: linSet, key: key, value: value, newRev: rev, call: call, return_: ret}
	}
	get := func(c int, call, ret int64, key int, read linVal) linOp {
		return linOp{client: c, kind: linGet, key: key, read: read, call: call, return_: ret}
	}
	txnAB := linOp{client: 0, kind: linTxn, writes: []linWrite{{key: 0, value: 1}, {key: 1, value: 1}}, ok: true, revs: []int64{0, 0}, call: 0, return_: 100}
	for _, tt := range []struct {
		name    string
		history []linOp
		want    bool
	}{
		{"sequential", []linOp{set(0, 0, 10, 0, 5, 0), get(1, 20, 30, 0, v(5, 0))}, true},
		{"a read overlapping the write sees it", []linOp{set(0, 0, 10, 0, 5, 0), get(1, 5, 8, 0, v(5, 0))}, true},
		{"a read overlapping the write misses it", []linOp{set(0, 0, 10, 0, 5, 0), get(1, 5, 8, 0, linVal{})}, true},
		{"a read after the write returned misses it", []linOp{set(0, 0, 10, 0, 5, 0), get(1, 20, 30, 0, linVal{})}, false},
		{"a stale read after a newer one", []linOp{
			set(0, 0, 10, 0, 5, 0), set(0, 20, 100, 0, 6, 1),
			get(1, 30, 40, 0, v(6, 1)), get(2, 50, 60, 0, v(5, 0)),
		}, false},
		{"a transaction read whole", []linOp{txnAB, get(1, 10, 20, 0, v(1, 0)), get(2, 30, 40, 1, v(1, 0))}, true},
		{"a transaction read before, then after", []linOp{txnAB, get(1, 10, 20, 0, linVal{}), get(2, 30, 40, 1, v(1, 0))}, true},
		{"a transaction read in part", []linOp{txnAB, get(1, 10, 20, 0, v(1, 0)), get(2, 30, 40, 1, linVal{})}, false},
		{"a check that held on a version never there", []linOp{
			set(0, 0, 10, 0, 5, 0),
			{client: 1, kind: linTxn, checks: []linCheck{{0, 1}}, writes: []linWrite{{key: 1, value: 2}}, ok: true, revs: []int64{0}, call: 20, return_: 30},
		}, false},
		{"a conflict that shows the current version", []linOp{
			set(0, 0, 10, 0, 5, 0),
			{client: 1, kind: linTxn, checks: []linCheck{{0, -1}, {1, -1}}, writes: []linWrite{{key: 1, value: 2}}, conflicts: []linVal{v(5, 0)}, call: 20, return_: 30},
		}, true},
		{"CAS", []linOp{
			set(0, 0, 10, 0, 5, 0),
			{client: 1, kind: linCAS, key: 0, value: 7, rev: 1, ok: true, newRev: 1, call: 20, return_: 30},
			{client: 2, kind: linCAS, key: 0, value: 8, rev: 1, read: v(7, 1), call: 25, return_: 40},
		}, true},
		{"two CAS to the same revision both applied", []linOp{
			set(0, 0, 10, 0, 5, 0),
			{client: 1, kind: linCAS, key: 0, value: 7, rev: 1, ok: true, newRev: 1, call: 20, return_: 30},
			{client: 2, kind: linCAS, key: 0, value: 8, rev: 1, ok: true, newRev: 1, call: 25, return_: 40},
		}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := linearizable(tt.history); got != tt.want {
				t.Errorf("linearizable: %v; want %v", got, tt.want)
			}
		})
	}
}

// linClient is one client's way of doing an operation: over HTTP or a
// WebSocket. It fills in o's answer.
type linClient func(o *linOp) error

func linHTTP(url string) linClient {
	return func(o *linOp) error {
		var method, path, body string
		var headers []string
		key := linKey(o.key)
		switch o.kind {
		case linGet:
			method, path = "GET", key
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
			return err
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return err
		}
		rev, _ := strconv.ParseInt(resp.Header.Get("X-Revision"), 10, 64)
		bad := func() error { return fmt.Errorf("%s %s %s: %d %s", method, path, body, resp.StatusCode, b) }
		switch {
		case o.kind == linGet && resp.StatusCode == 404:
			o.read = linVal{}
		case o.kind == linGet && resp.StatusCode == 200:
			o.read, err = linValOf(b, rev)
		case o.kind == linSet && resp.StatusCode == 200:
			o.newRev = rev
		case o.kind == linCAS && resp.StatusCode == 200:
			o.ok, o.newRev = true, rev
		case o.kind == linCAS && resp.StatusCode == 409:
			o.read, err = linValOf(b, rev)
		case o.kind == linDelete && resp.StatusCode == 200:
			var d struct{ Deleted bool }
			err = json.Unmarshal(b, &d)
			o.existed = int8(btoi(d.Deleted))
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

// linTxnBody is a transaction's body (and the txn message's payload).
func linTxnBody(o *linOp) string {
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
func linTxnAnswer(o *linOp, applied bool, b []byte) error {
	var a struct {
		Revisions map[string]int64
		Conflicts []struct {
			Key      string
			Value    json.RawMessage
			Revision int64
		}
	}
	if err := json.Unmarshal(b, &a); err != nil {
		return err
	}
	o.ok = applied
	if applied {
		if len(a.Revisions) != len(o.writes) {
			return fmt.Errorf("revisions of %d keys; want %d", len(a.Revisions), len(o.writes))
		}
		for _, w := range o.writes {
			rev, ok := a.Revisions[linKey(w.key)]
			if !ok {
				return fmt.Errorf("no revision of %s", linKey(w.key))
			}
			o.revs = append(o.revs, rev)
		}
		return nil
	}
	if len(a.Conflicts) == 0 {
		return fmt.Errorf("a conflict without conflicts")
	}
	for _, c := range a.Conflicts {
		v, err := linValOf(c.Value, c.Revision)
		if err != nil {
			return err
		}
		o.conflicts = append(o.conflicts, v)
	}
	return nil
}

func linWS(p *wsPeer) linClient {
	return func(o *linOp) error {
		key := linKey(o.key)
		var typ, payload string
		switch o.kind {
		case linGet:
			typ, payload = "get", fmt.Sprintf(`{"key":%q}`, key)
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
			return err
		}
		var ev struct {
			Value    json.RawMessage
			Revision int64
		}
		json.Unmarshal(m.Payload, &ev)
		switch {
		case o.kind == linGet && m.Type == "no-value":
			o.read = linVal{}
		case o.kind == linGet && m.Type == "value":
			o.read, err = linValOf(ev.Value, ev.Revision)
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

func (w *linWorkload) next() linOp {
	w.n++
	o := linOp{client: w.client, key: w.rnd.IntN(linKeys), value: int64(w.client)*1000 + w.n}
	switch r := w.rnd.IntN(10); {
	case r < 3:
		o.kind = linGet
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
func (w *linWorkload) saw(o *linOp) {
	rev := func(v linVal) int64 {
		if v.present {
			return v.rev
		}
		return -1
	}
	switch {
	case o.kind == linGet || o.kind == linCAS && !o.ok:
		w.seen[o.key] = rev(o.read)
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

// TestLinearizable: four clients, two over HTTP and two over WebSocket
// connections, each do 50 random operations on three keys of an
// in-process server: GET/get, POST/set, PUT/update (compare-and-swap),
// DELETE/delete and transactions with checks (applied or in conflict).
// The history of what each asked, was answered, and when, must be
// linearizable; and the same history with one read's answer changed to
// a value never written must not be. In memory and with -data.
func TestLinearizable(t *testing.T) {
	t.Run("memory", func(t *testing.T) { linearizableServer(t) })
	t.Run("data", func(t *testing.T) { linearizableServer(t, "-data", t.TempDir()) })
}

func linearizableServer(t *testing.T, args ...string) {
	_, url := newTestServer(t, args...)
	start := time.Now()
	histories := make([][]linOp, 4)
	var wg sync.WaitGroup
	for c := range histories {
		var do linClient
		if c < 2 {
			do = linHTTP(url)
		} else {
			p, err := dialPeer(url)
			if err != nil {
				t.Fatal(err)
			}
			defer p.ws.Close()
			do = linWS(p)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			w := &linWorkload{rnd: rand.New(rand.NewPCG(uint64(c), uint64(time.Now().UnixNano()))), client: c, seen: [linKeys]int64{-1, -1, -1}}
			for range 50 {
				o := w.next()
				o.call = int64(time.Since(start))
				if err := do(&o); err != nil {
					t.Error(err)
					return
				}
				o.return_ = int64(time.Since(start))
				w.saw(&o)
				histories[c] = append(histories[c], o)
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	var history []linOp
	conflicts, applied := 0, 0
	for _, h := range histories {
		history = append(history, h...)
		for _, o := range h {
			if o.kind == linTxn && o.ok {
				applied++
			} else if o.kind == linTxn {
				conflicts++
			}
		}
	}
	if !linearizable(history) {
		for _, o := range history {
			t.Log(o)
		}
		t.Fatalf("a history of %d operations is not linearizable", len(history))
	}
	// The checker is not vacuous on this history: a read of a value never
	// written makes it fail.
	for i := range history {
		if o := &history[i]; o.kind == linGet {
			o.read = linVal{true, -7, 0}
			if linearizable(history) {
				t.Errorf("the history with %v is linearizable: the checker accepts anything", o)
			}
			break
		}
	}
	t.Logf("%d operations linearizable; transactions: %d applied, %d in conflict", len(history), applied, conflicts)
}
