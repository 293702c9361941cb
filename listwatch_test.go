package main

// Tests of what listings and states promise together (SPEC 3a, 4a, 11):
// list, then watch from the smallest X-Seq, and the view is the store's;
// a state comes whole in key order; no listing or state shows part of a
// transaction.

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// held is a key's value and revision, as a client holds it.
type held struct {
	value string
	rev   int64
}

// wsListMsg is a WebSocket message of a subscription, or a reply.
type wsListMsg struct {
	Type    string
	Payload struct {
		Key      string
		Value    json.RawMessage
		Revision int64
		Seq      int64
		Reason   string
		Items    []listItem
		Next     *string
	}
	ID json.RawMessage
}

func decodeWS(t testing.TB, msg string) wsListMsg {
	t.Helper()
	var ev wsListMsg
	if err := json.Unmarshal([]byte(msg), &ev); err != nil {
		t.Fatalf("%v: %.200s", err, msg)
	}
	return ev
}

// churn runs writers over the keys prefix+"k000" … "k199" until stop is
// closed: sets and deletes of single keys, and transactions of three
// keys (sets and deletes), over HTTP. It returns a wait function and
// the count of changes acknowledged so far.
func churn(t *testing.T, base, prefix string, writers int, stop <-chan struct{}) (wait func(), done *atomic.Int64) {
	done = new(atomic.Int64)
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			key := func() string { return fmt.Sprintf("%sk%03d", prefix, rng.IntN(200)) }
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				var resp response
				switch rng.IntN(5) {
				case 0:
					resp = do(t, "DELETE", base+key(), "")
				case 1:
					a, b, c := key(), key(), key()
					if a == b || b == c || a == c {
						continue
					}
					resp = do(t, "POST", base+"/", fmt.Sprintf(`{"ops":[{"op":"set","key":%q,"value":{"w":%d,"i":%d}},{"op":"delete","key":%q},{"op":"set","key":%q,"value":[%d]}]}`, a, w, i, b, c, i))
				default:
					resp = do(t, "POST", base+key(), fmt.Sprintf(`{"w":%d,"i":%d}`, w, i))
				}
				if resp.code != 200 {
					t.Errorf("write: %d %s", resp.code, resp.body)
					return
				}
				done.Add(1)
			}
		}()
	}
	return wg.Wait, done
}

// storeView is what the store holds under prefix, by a listing in
// pages of 10,000 (in a quiet store, so that their X-Seqs do not matter).
func storeView(t testing.TB, base, prefix string) map[string]held {
	t.Helper()
	view := map[string]held{}
	for _, p := range allPages(t, base, escapePath(prefix)+"?limit=10000", nil, "Accept", "application/json") {
		for _, it := range p.items {
			view[it.Key] = held{string(it.Value), it.Revision}
		}
	}
	return view
}

// diffViews describes how a client's view differs from the store's, or
// returns "" if they are the same.
func diffViews(got, want map[string]held) string {
	var b strings.Builder
	for k, v := range want {
		if g, ok := got[k]; !ok {
			fmt.Fprintf(&b, "\n  %s: missing; store has %s@%d", k, v.value, v.rev)
		} else if g != v {
			fmt.Fprintf(&b, "\n  %s: %s@%d; store has %s@%d", k, g.value, g.rev, v.value, v.rev)
		}
	}
	for k, g := range got {
		if _, ok := want[k]; !ok {
			fmt.Fprintf(&b, "\n  %s: %s@%d; store has none", k, g.value, g.rev)
		}
	}
	return b.String()
}

// TestListThenWatch: the list-then-watch pattern (SPEC 3a). While writers
// set and delete keys (alone and in transactions), a client lists the
// prefix page by page, then subscribes with since = the smallest X-Seq
// of its pages: over SSE (Last-Event-ID) after HTTP pages, and over the
// WebSocket (since) after WebSocket pages. Once the writers stop and the
// client has the event of a last write, its view is the store's: every
// key, value and revision, and no key the store does not hold.
func TestListThenWatch(t *testing.T) {
	_, base := newTestServer(t)
	const prefix = "/w/"
	for i := range 200 {
		do(t, "POST", fmt.Sprintf("%s%sk%03d", base, prefix, i), `"first"`)
	}
	stop := make(chan struct{})
	wait, writes := churn(t, base, prefix, 3, stop)
	stopped := false
	defer func() {
		if !stopped {
			close(stop)
			wait()
		}
	}()

	// A watcher's goroutine closes done when it ends: once the marker's
	// event came, or on a failure (a helper's t.Fatal ends it too).
	type watcher struct {
		name   string
		synced chan struct{} // closed once the state after since is whole
		done   chan struct{}
		marked bool
		view   map[string]held
		err    error
	}
	newWatcher := func(name string) *watcher {
		return &watcher{name: name, synced: make(chan struct{}), done: make(chan struct{}), view: map[string]held{}}
	}
	sse, ws := newWatcher("SSE"), newWatcher("WebSocket")
	const marker = prefix + "~marker"

	// Between two pages, the writers change something.
	between := func() {
		n := writes.Load() + 10
		waitFor(t, "writes between pages", func() bool { return writes.Load() >= n })
	}

	// SSE: HTTP pages, then Last-Event-ID.
	go func() {
		w := sse
		defer close(w.done)
		since := int64(-1)
		pages := allPages(t, base, prefix+"?limit=17", between)
		for _, p := range pages {
			if since < 0 || p.seq < since {
				since = p.seq
			}
			for _, it := range p.items {
				w.view[it.Key] = held{string(it.Value), it.Revision}
			}
		}
		events := subscribe(t, base, prefix, "Last-Event-ID", strconv.FormatInt(since, 10))
		for ev := range events {
			switch {
			case ev.name == "reset":
				w.err = fmt.Errorf("reset after resuming from %d, which the history holds", since)
				return
			case ev.name == "synced":
				close(w.synced)
			case ev.name != "":
			case ev.rev < 0:
				delete(w.view, ev.key)
			default:
				w.view[ev.key] = held{ev.data, ev.rev}
			}
			if ev.key == marker {
				w.marked = true
				return
			}
		}
	}()

	// WebSocket: list pages with next, then subscribe with since.
	c := dialWS(t, base, "")
	go func() {
		w := ws
		defer close(w.done)
		since := int64(-1)
		after := ""
		for {
			c.send(fmt.Sprintf(`{"type":"list","payload":{"prefix":%q,"limit":23,"after":%q},"id":"list"}`, prefix, after))
			ev := decodeWS(t, c.recvRaw())
			if ev.Type != "values" || ev.Payload.Seq == 0 {
				w.err = fmt.Errorf("list: %+v", ev)
				return
			}
			if since < 0 || ev.Payload.Seq < since {
				since = ev.Payload.Seq
			}
			for _, it := range ev.Payload.Items {
				w.view[it.Key] = held{string(it.Value), it.Revision}
			}
			if ev.Payload.Next == nil {
				break
			}
			after = *ev.Payload.Next
			between()
		}
		c.send(fmt.Sprintf(`{"type":"subscribe","payload":{"key":%q,"since":%d}}`, prefix, since))
		for {
			ev := decodeWS(t, c.recvRaw())
			switch ev.Type {
			case "reset":
				w.err = fmt.Errorf("reset after resuming from %d, which the history holds", since)
				return
			case "synced":
				close(w.synced)
			case "no-value":
				delete(w.view, ev.Payload.Key)
			case "value":
				w.view[ev.Payload.Key] = held{string(ev.Payload.Value), ev.Payload.Revision}
			}
			if ev.Payload.Key == marker {
				w.marked = true
				return
			}
		}
	}()

	for _, w := range []*watcher{sse, ws} {
		select {
		case <-w.synced:
		case <-w.done:
		}
	}
	// Writers go on past the subscriptions: their changes come live.
	n := writes.Load() + 500
	waitFor(t, "writes after the subscriptions", func() bool { return writes.Load() >= n })
	close(stop)
	wait()
	stopped = true
	do(t, "POST", base+marker, `"end"`)
	want := storeView(t, base, prefix)
	for _, w := range []*watcher{sse, ws} {
		<-w.done
		switch {
		case w.err != nil:
			t.Errorf("%s: %v", w.name, w.err)
		case !w.marked:
			t.Errorf("%s: ended before the marker's event", w.name)
		}
		if d := diffViews(w.view, want); d != "" {
			t.Errorf("%s: the client's view after list, then watch, differs from the store's:%s", w.name, d)
		}
	}
	t.Logf("%d writes; %d keys at the end", writes.Load(), len(want))
}

// stateOf is a state as a stream sent it: the keys in the order they
// came, each one's version (rev -1: missing), and whether a reset came
// first.
type stateOf struct {
	keys  []string
	vers  map[string]held
	reset bool
	seq   int64 // synced's
}

// checkOrder fails the test unless the state's keys are in strictly
// increasing key order (SPEC 3a: whole, not only within a chunk).
func (st stateOf) checkOrder(t *testing.T, what string) {
	t.Helper()
	for i := 1; i < len(st.keys); i++ {
		if st.keys[i-1] >= st.keys[i] {
			t.Errorf("%s: key %d %q after %q: want strictly increasing key order", what, i, st.keys[i], st.keys[i-1])
			return
		}
	}
}

// sseState opens an event stream of path with headers, reads its state
// up to synced, and closes it.
func sseState(t *testing.T, base, path string, headers ...string) stateOf {
	t.Helper()
	events, stop := openStream(t, base, path, headers...)
	defer stop()
	st := stateOf{vers: map[string]held{}}
	for {
		ev := nextEvent(t, events)
		switch ev.name {
		case "reset":
			if len(st.keys) > 0 {
				t.Fatalf("%s: reset after %d keys of the state", path, len(st.keys))
			}
			st.reset = true
		case "synced":
			st.seq = ev.seq
			return st
		case "":
			st.keys = append(st.keys, ev.key)
			st.vers[ev.key] = held{ev.data, ev.rev}
		}
	}
}

// wsState subscribes c to path with the payload's extra members (such
// as "initial":true), reads the state up to synced, and unsubscribes.
func wsState(t *testing.T, c *wsClient, path, extra string) stateOf {
	t.Helper()
	c.send(fmt.Sprintf(`{"type":"subscribe","payload":{"key":%q,%s},"id":"sub"}`, path, extra))
	if ev := decodeWS(t, c.recvRaw()); ev.Type != "ok" {
		t.Fatalf("subscribe %s: %+v", path, ev)
	}
	st := stateOf{vers: map[string]held{}}
	for {
		ev := decodeWS(t, c.recvRaw())
		switch ev.Type {
		case "reset":
			if len(st.keys) > 0 {
				t.Fatalf("%s: reset after %d keys of the state", path, len(st.keys))
			}
			st.reset = true
		case "value":
			st.keys = append(st.keys, ev.Payload.Key)
			st.vers[ev.Payload.Key] = held{string(ev.Payload.Value), ev.Payload.Revision}
		case "no-value":
			st.keys = append(st.keys, ev.Payload.Key)
			st.vers[ev.Payload.Key] = held{"null", -1}
		case "synced":
			st.seq = ev.Payload.Seq
			c.send(fmt.Sprintf(`{"type":"unsubscribe","payload":{"key":%q},"id":"unsub"}`, path))
			for decodeWS(t, c.recvRaw()).Type != "ok" {
			}
			return st
		default:
			t.Fatalf("subscribe %s: %+v", path, ev)
		}
	}
}

// TestStatesInKeyOrder: a state of more than 1,000 keys, written in
// random order, comes whole in strictly increasing key order, over SSE
// and the WebSocket: after ?initial (initial), after a reset (a bad
// Last-Event-ID, an unknown since), after a since resume that touches
// more than 1,000 keys (sets and deletes, in random order; the deleted
// ones as missing, in their place), and after a resume past 16,384
// changed keys, which is sent as a reset and the whole state.
func TestStatesInKeyOrder(t *testing.T) {
	srv, base := newTestServer(t)
	rng := rand.New(rand.NewPCG(5, 6))
	words := []string{"a", "b", "b0", "b.", "b/", "é", "ключ", "😀", "z", "%", ":"}
	var keys []string
	for i := range 1500 {
		k := fmt.Sprintf("/s/%s%d", words[rng.IntN(len(words))], i)
		if strings.Contains(k, "//") || strings.HasSuffix(k, "/") {
			continue
		}
		keys = append(keys, k)
	}
	for _, i := range rng.Perm(len(keys)) {
		srv.store.Set(keys[i], fmt.Sprintf(`{"n":%d}`, i), 0)
	}
	srv.store.Set("/s0", `"beside"`, 0)
	srv.store.Set("/r", `"beside"`, 0)
	c := dialWS(t, base, "")

	check := func(t *testing.T, what string, st stateOf, want map[string]held, reset bool) {
		t.Helper()
		st.checkOrder(t, what)
		if len(st.keys) != len(want) {
			t.Errorf("%s: %d keys; want %d", what, len(st.keys), len(want))
		}
		if d := diffViews(st.vers, want); d != "" {
			t.Errorf("%s: the state differs from the store:%.2000s", what, d)
		}
		if st.reset != reset {
			t.Errorf("%s: reset %v; want %v", what, st.reset, reset)
		}
	}

	whole := storeView(t, base, "/s/")
	t.Run("initial", func(t *testing.T) {
		check(t, "SSE ?initial", sseState(t, base, "/s/?initial"), whole, false)
		check(t, "WebSocket initial", wsState(t, c, "/s/", `"initial":true`), whole, false)
		check(t, "WebSocket initial, KvServer's spelling", wsState(t, c, "s/", `"initial":true`), spelled(whole), false)
		everything := storeView(t, base, "/")
		check(t, "SSE / ?initial", sseState(t, base, "/?initial"), everything, false)
	})
	t.Run("reset", func(t *testing.T) {
		check(t, "SSE Last-Event-ID: garbage", sseState(t, base, "/s/", "Last-Event-ID", "garbage"), whole, true)
		check(t, "SSE Last-Event-ID: 12", sseState(t, base, "/s/", "Last-Event-ID", "12"), whole, true)
		check(t, "WebSocket since: garbage", wsState(t, c, "/s/", `"since":"garbage"`), whole, true)
		check(t, "WebSocket since: 1", wsState(t, c, "/s/", `"since":1`), whole, true)
	})
	t.Run("since", func(t *testing.T) {
		from := sseState(t, base, "/s/?initial").seq
		changed := map[string]held{}
		for n, i := range rng.Perm(len(keys))[:1200] {
			if n%5 == 0 {
				srv.store.Delete(keys[i], -1)
				changed[keys[i]] = held{"null", -1}
			} else {
				e, _ := srv.store.Set(keys[i], fmt.Sprintf(`{"n":%d,"again":true}`, i), 0)
				changed[keys[i]] = held{e.value, e.revision}
			}
		}
		srv.store.Set("/s0", `"beside, changed"`, 0)
		id := strconv.FormatInt(from, 10)
		check(t, "SSE Last-Event-ID after 1,200 changes", sseState(t, base, "/s/", "Last-Event-ID", id), changed, false)
		check(t, "WebSocket since after 1,200 changes", wsState(t, c, "/s/", `"since":`+id), changed, false)
	})
	t.Run("since past 16384 keys", func(t *testing.T) {
		from := sseState(t, base, "/s/?initial").seq
		for i := range sinceMax + 100 {
			srv.store.Set(fmt.Sprintf("/s/many/%05d", (i*7919)%(sinceMax+100)), `1`, 0)
		}
		whole := storeView(t, base, "/s/")
		id := strconv.FormatInt(from, 10)
		check(t, "SSE Last-Event-ID", sseState(t, base, "/s/", "Last-Event-ID", id), whole, true)
		check(t, "WebSocket since", wsState(t, c, "/s/", `"since":`+id), whole, true)
	})
}

// spelled is a view with its keys spelled KvServer's way.
func spelled(view map[string]held) map[string]held {
	out := map[string]held{}
	for k, v := range view {
		out[k[1:]] = v
	}
	return out
}

// sumOf adds up the values of items, which are integers; it fails the
// test on any other value.
func sumOf(t testing.TB, items []listItem) (sum int64) {
	t.Helper()
	for _, it := range items {
		n, err := strconv.ParseInt(string(it.Value), 10, 64)
		if err != nil {
			t.Fatalf("%s: value %s: %v", it.Key, it.Value, err)
		}
		sum += n
	}
	return sum
}

// TestListingsNeverSplitTransactions: while transactions move amounts
// between accounts (and rename accounts: delete one, create another with
// its balance), so that the sum under the prefix never changes, every
// listing and every state shows that sum (SPEC 11: no listing or state
// ever shows part of a transaction): HTTP listings whole, as one page,
// shallow and of everything; pages of groups whose transactions stay
// within the group; the WebSocket list; SSE and WebSocket initial
// states. The accounts span several reads of the index, and the readers
// go on until they have each read many times and the movers have
// committed thousands of transactions.
func TestListingsNeverSplitTransactions(t *testing.T) {
	srv, base := newTestServer(t)
	const accounts, groups, start = 600, 16, 100
	// Accounts are renamed to names never used before: a key written
	// again after a delete starts again at revision 0, and a check of a
	// revision read before must not pass for the key's next life.
	names := make([]string, accounts)
	var namesMu sync.Mutex
	var generation atomic.Int64
	for i := range accounts {
		names[i] = fmt.Sprintf("/bank/a%04d.0", i)
		srv.store.Set(names[i], strconv.Itoa(start), 0)
	}
	for g := range groups {
		for i := range 4 {
			srv.store.Set(fmt.Sprintf("/grp/g%03d/%d", g, i), strconv.Itoa(start), 0)
		}
	}
	const bankSum, groupSum = accounts * start, 4 * start

	stop := make(chan struct{})
	var committed atomic.Int64
	var movers sync.WaitGroup
	// A mover moves amounts (or, if pick says how to record a rename,
	// renames an account), committing through the store or over HTTP.
	mover := func(seed uint64, pick func(rng *rand.Rand) (from, to string, renamed func()), viaHTTP bool) {
		defer movers.Done()
		rng := rand.New(rand.NewPCG(seed, 9))
		for {
			select {
			case <-stop:
				return
			default:
			}
			from, to, renamed := pick(rng)
			rename := renamed != nil
			a, b := srv.store.Get(from), srv.store.Get(to)
			if a == nil || from == to || (b == nil) != rename {
				continue
			}
			na, _ := strconv.ParseInt(a.value, 10, 64)
			var tx *txn
			if rename { // from goes, to comes with its balance
				tx = &txn{checks: []check{{from, a.revision}, {to, noRevision}},
					ops: []op{{key: from, del: true}, {key: to, value: a.value}}}
			} else {
				nb, _ := strconv.ParseInt(b.value, 10, 64)
				amount := rng.Int64N(na + 1)
				tx = &txn{checks: []check{{from, a.revision}, {to, b.revision}},
					ops: []op{{key: from, value: strconv.FormatInt(na-amount, 10)}, {key: to, value: strconv.FormatInt(nb+amount, 10)}}}
			}
			if viaHTTP {
				body, _ := json.Marshal(map[string]any{
					"check": []map[string]any{{"key": tx.checks[0].key, "revision": tx.checks[0].revision}, {"key": tx.checks[1].key, "revision": tx.checks[1].revision}},
					"ops":   txnOpsJSON(tx.ops),
				})
				switch resp := do(t, "POST", base+"/", string(body)); resp.code {
				case 200:
					committed.Add(1)
					if rename {
						renamed()
					}
				case 409:
				default:
					t.Errorf("transaction: %d %s", resp.code, resp.body)
					return
				}
				continue
			}
			if err := srv.store.Commit(tx); err == nil {
				committed.Add(1)
				if rename {
					renamed()
				}
			}
			runtime.Gosched() // leave the readers a share of the CPUs
		}
	}
	bankPick := func(rng *rand.Rand) (from, to string, renamed func()) {
		namesMu.Lock()
		defer namesMu.Unlock()
		i := rng.IntN(accounts)
		from = names[i]
		if rng.IntN(4) > 0 {
			return from, names[rng.IntN(accounts)], nil
		}
		// A new name, anywhere among the others.
		to = fmt.Sprintf("/bank/a%04d.%d", rng.IntN(accounts), generation.Add(1))
		return from, to, func() {
			namesMu.Lock()
			defer namesMu.Unlock()
			if names[i] == from {
				names[i] = to
			}
		}
	}
	groupPick := func(rng *rand.Rand) (string, string, func()) {
		g := rng.IntN(groups)
		return fmt.Sprintf("/grp/g%03d/%d", g, rng.IntN(4)), fmt.Sprintf("/grp/g%03d/%d", g, rng.IntN(4)), nil
	}
	movers.Add(4)
	go mover(1, bankPick, true)
	go mover(2, bankPick, false)
	go mover(3, bankPick, false)
	go mover(4, groupPick, false)
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		movers.Wait()
	}()

	var readers sync.WaitGroup
	var reads atomic.Int64
	// read calls f until it has run 10 times and the movers have
	// committed 2,000 transactions, each time checking what it returned.
	read := func(what string, f func() error) {
		readers.Add(1)
		go func() {
			defer readers.Done()
			for i := 0; i < 10 || committed.Load() < 2000; i++ {
				if err := f(); err != nil {
					t.Errorf("%s, read %d: %v", what, i, err)
					return
				}
				reads.Add(1)
			}
		}()
	}
	bank := func(items []listItem) error {
		if got := sumOf(t, items); got != bankSum {
			return fmt.Errorf("%d accounts sum to %d; want %d", len(items), got, bankSum)
		}
		return nil
	}
	read("GET /bank/", func() error { return bank(getPage(t, base+"/bank/").items) })
	read("GET /bank/?limit=10000", func() error { return bank(getPage(t, base+"/bank/?limit=10000").items) })
	read("GET /bank/?shallow", func() error { return bank(getPage(t, base+"/bank/?shallow").items) })
	read("GET / (everything)", func() error {
		items := getPage(t, base+"/", "Accept", "application/json").items
		var b []listItem
		for _, it := range items {
			if strings.HasPrefix(it.Key, "/bank/") {
				b = append(b, it)
			}
		}
		return bank(b)
	})
	for _, limit := range []int{4, 8} {
		read(fmt.Sprintf("GET /grp/?limit=%d, page by page", limit), func() error {
			for _, p := range allPages(t, base, fmt.Sprintf("/grp/?limit=%d", limit), nil) {
				if got, want := sumOf(t, p.items), int64(groupSum*len(p.items)/4); got != want || len(p.items)%4 != 0 {
					return fmt.Errorf("a page of %d accounts (%s…) sums to %d; want %d", len(p.items), p.items[0].Key, got, want)
				}
			}
			return nil
		})
	}
	listWS := dialRawWS(t, base)
	read("WebSocket list /bank/", func() error {
		listWS.send(`{"type":"list","payload":{"prefix":"/bank/"}}`)
		msg, _ := listWS.read()
		var reply struct{ Payload []listItem }
		if err := json.Unmarshal(msg, &reply); err != nil {
			return err
		}
		return bank(reply.Payload)
	})
	stateItems := func(st stateOf) []listItem {
		var items []listItem
		for k, v := range st.vers {
			items = append(items, listItem{Key: k, Value: json.RawMessage(v.value)})
		}
		return items
	}
	read("SSE /bank/?initial", func() error { return bank(stateItems(sseState(t, base, "/bank/?initial"))) })
	stateWS := dialWS(t, base, "")
	read("WebSocket subscribe /bank/ initial", func() error { return bank(stateItems(wsState(t, stateWS, "/bank/", `"initial":true`))) })
	readers.Wait()
	close(stop)
	movers.Wait()
	if got := sumOf(t, getPage(t, base+"/bank/").items); got != bankSum {
		t.Errorf("at the end the accounts sum to %d; want %d", got, bankSum)
	}
	t.Logf("%d transactions committed, %d listings and states read", committed.Load(), reads.Load())
}

// txnOpsJSON is ops as a transaction's body gives them.
func txnOpsJSON(ops []op) []map[string]any {
	var out []map[string]any
	for _, o := range ops {
		if o.del {
			out = append(out, map[string]any{"op": "delete", "key": o.key})
		} else {
			out = append(out, map[string]any{"op": "set", "key": o.key, "value": json.RawMessage(o.value)})
		}
	}
	return out
}

// TestTransactionEvents: a transaction's events on a stream come one
// after another, and every one but the last carries the resume point the
// stream sent last before them (its start point if none), the last the
// transaction's seq (SPEC 11); on the WebSocket those carry "more": true
// too. So a client cut off inside a transaction resumes before it,
// without a reset, and gets all of it.
func TestTransactionEvents(t *testing.T) {
	_, base := newTestServer(t)
	txn := func(body string) int64 {
		t.Helper()
		resp := do(t, "POST", base+"/", body)
		var done struct{ Seq int64 }
		if err := json.Unmarshal([]byte(resp.body), &done); err != nil || resp.code != 200 {
			t.Fatalf("POST / %s: %d %s", body, resp.code, resp.body)
		}
		return done.Seq
	}
	const abc = `{"ops":[{"op":"set","key":"/t/a","value":1},{"op":"set","key":"/t/b","value":2},{"op":"delete","key":"/t/none"},{"op":"set","key":"/u/c","value":3},{"op":"set","key":"/t/d","value":4}]}`

	t.Run("SSE", func(t *testing.T) {
		start := getPage(t, base+"/t/?limit=1").seq // nothing changes before the stream starts
		events := subscribe(t, base, "/t/")
		s1 := txn(abc)
		for _, want := range []string{"/t/a", "/t/b", "/t/d"} {
			ev := next(t, events)
			tag := start
			if want == "/t/d" {
				tag = s1
			}
			if ev.key != want || ev.seq != tag {
				t.Errorf("first transaction: %s tagged %d; want %s tagged %d (the stream's start point, the last one its seq)", ev.key, ev.seq, want, tag)
			}
		}
		do(t, "POST", base+"/t/x", `5`)
		s2 := next(t, events).seq
		s3 := txn(`{"ops":[{"op":"delete","key":"/t/a"},{"op":"set","key":"/t/b","value":6}]}`)
		if ev := next(t, events); ev.key != "/t/a" || ev.rev != -1 || ev.seq != s2 {
			t.Errorf("second transaction, first event: %v tagged %d; want /t/a deleted, tagged %d", ev, ev.seq, s2)
		}
		if ev := next(t, events); ev.key != "/t/b" || ev.seq != s3 {
			t.Errorf("second transaction, last event: %v tagged %d; want /t/b tagged %d", ev, ev.seq, s3)
		}
	})

	t.Run("WebSocket", func(t *testing.T) {
		c := dialWS(t, base, "")
		c.roundTrip(`{"type":"subscribe","payload":{"key":"/t/"},"id":1}`, `{"type":"ok","payload":{"key":"/t/"},"id":1}`)
		s1 := txn(abc)
		var first int64
		for _, want := range []string{"/t/a", "/t/b", "/t/d"} {
			msg := c.recvRaw()
			ev := decodeWS(t, msg)
			more := strings.Contains(msg, `"more":true`)
			if ev.Payload.Key != want || more != (want != "/t/d") {
				t.Errorf("got %s; want %s, with \"more\": true unless it is the last", msg, want)
			}
			if want == "/t/a" {
				first = ev.Payload.Seq
			}
			if want == "/t/d" && ev.Payload.Seq != s1 {
				t.Errorf("the last event: %s; want seq %d", msg, s1)
			}
			if want == "/t/b" && ev.Payload.Seq != first {
				t.Errorf("%s: want the seq of the event before, %d", msg, first)
			}
		}
		// Cut off after the first event: resuming from its seq must not
		// reset, and must bring the whole transaction.
		other := dialWS(t, base, "")
		st := wsState(t, other, "/t/", fmt.Sprintf(`"since":%d`, first))
		if st.reset || len(st.keys) != 3 {
			t.Errorf("resumed from %d, the seq of a live subscription's first event of a transaction: reset %v, keys %q; want no reset and /t/a, /t/b, /t/d", first, st.reset, st.keys)
		}
	})
}
