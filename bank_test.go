package main

// The bank: accounts under /bank/ hold a known total, and transfers
// between them are transactions, so that every observer of the store,
// at every point it may stand on, sees the same total (SPEC 11, "Atomic
// for every observer").

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

const (
	bankOpen  = 6   // accounts open at the start: /bank/0 …
	bankStart = 100 // each one's first balance
	bankTotal = bankOpen * bankStart
)

func bankKey(i int) string { return "/bank/" + strconv.Itoa(i) }

// A txnWrite is what a transact function does to one of its keys.
type txnWrite struct {
	keep  bool // leave it as it is (it is still checked)
	del   bool
	value int64
}

// A keyReader reads keys: each value (nil: missing) and revision (-1:
// missing).
type keyReader func(keys []string) ([]*int64, []int64, error)

// A txnCommitter sends a transaction and reports whether it was applied;
// false, nil is a conflict.
type txnCommitter func(body string) (applied bool, err error)

// errAborted is a transact whose function gave up.
var errAborted = errors.New("aborted")

// transact is client.js's transact in Go: it reads keys, has fn compute
// what to write, and commits that with a check on every revision read;
// on a conflict it runs again on what it reads then. fn returning nil
// aborts. It returns how many conflicts it went through.
func transact(read keyReader, commit txnCommitter, keys []string, fn func([]*int64) []txnWrite) (conflicts int, err error) {
	for conflicts = 0; conflicts < 1000; conflicts++ {
		values, revs, err := read(keys)
		if err != nil {
			return conflicts, err
		}
		writes := fn(values)
		if writes == nil {
			return conflicts, errAborted
		}
		var checks, ops []string
		for i, key := range keys {
			checks = append(checks, fmt.Sprintf(`{"key":%q,"revision":%d}`, key, revs[i]))
			switch w := writes[i]; {
			case w.keep:
			case w.del:
				ops = append(ops, fmt.Sprintf(`{"op":"delete","key":%q}`, key))
			default:
				ops = append(ops, fmt.Sprintf(`{"op":"set","key":%q,"value":%d}`, key, w.value))
			}
		}
		body := `{"check":[` + strings.Join(checks, ",") + `],"ops":[` + strings.Join(ops, ",") + `]}`
		applied, err := commit(body)
		if err != nil || applied {
			return conflicts, err
		}
	}
	return conflicts, errors.New("1000 conflicts in a row")
}

// bankClient is how a writer reaches the bank: it lists the open
// accounts, reads keys and commits transactions.
type bankClient struct {
	list   func() ([]string, error)
	read   keyReader
	commit txnCommitter
	name   string // the writer's, in the keys of the accounts it opens
	opened int
}

// move does one random thing to the bank that keeps its total, as a
// transaction from transact: moves an amount between two accounts, or
// from one to two others (deleting a key that never was, which is no
// change); closes an account (deleted) into another; opens one (a new
// key) from another; writes an account's own balance again (one key);
// or writes a key elsewhere, which moves the change sequence past what
// the subscribers of /bank/ see. It reports whether the transaction
// was applied (not aborted: an account it picked was closed meanwhile).
//
// It never writes a key that was deleted: a key written again starts
// again at revision 0, so a check of revision 0 read before the delete
// would hold on the new key (the ABA problem), and a transfer would
// then lose or make money.
func (bc *bankClient) move(rnd *rand.Rand) (applied bool, conflicts int, err error) {
	accounts, err := bc.list()
	if err != nil {
		return false, 0, err
	}
	if len(accounts) == 0 {
		return false, 0, errors.New("no account open: the money is gone")
	}
	// Writers close accounts concurrently: fewer than three may be left,
	// and then one opens.
	accounts = append(accounts, accounts[0], accounts[0])
	perm := rnd.Perm(len(accounts) - 2)
	a, b, c := accounts[perm[0]], accounts[perm[min(1, len(perm)-1)]], accounts[perm[min(2, len(perm)-1)]]
	amount := int64(1 + rnd.IntN(20))
	var keys []string
	var fn func(v []*int64) []txnWrite
	all := func(v []*int64) bool { return !slices.Contains(v, nil) }
	switch k := rnd.IntN(10); {
	case len(perm) < 3 || k == 6 && len(perm) < 9: // open one from a
		bc.opened++
		keys = []string{a, fmt.Sprintf("/bank/%s-%d", bc.name, bc.opened)}
		fn = func(v []*int64) []txnWrite {
			if v[0] == nil {
				return nil
			}
			return []txnWrite{{value: *v[0] - amount}, {value: amount}}
		}
	case k == 5 && len(perm) > 4: // close a into b
		keys = []string{a, b}
		fn = func(v []*int64) []txnWrite {
			if !all(v) {
				return nil
			}
			return []txnWrite{{del: true}, {value: *v[1] + *v[0]}}
		}
	case k == 7: // a to b and c
		keys = []string{a, b, c, "/bank/never"}
		fn = func(v []*int64) []txnWrite {
			if !all(v[:3]) {
				return nil
			}
			return []txnWrite{{value: *v[0] - 2*amount}, {value: *v[1] + amount}, {value: *v[2] + amount}, {del: true}}
		}
	case k == 8: // a single write
		keys = []string{a}
		fn = func(v []*int64) []txnWrite {
			if !all(v) {
				return nil
			}
			return []txnWrite{{value: *v[0]}}
		}
	case k == 9: // elsewhere
		keys = []string{"/elsewhere"}
		fn = func([]*int64) []txnWrite { return []txnWrite{{value: amount}} }
	default: // a to b
		keys = []string{a, b}
		fn = func(v []*int64) []txnWrite {
			if !all(v) {
				return nil
			}
			return []txnWrite{{value: *v[0] - amount}, {value: *v[1] + amount}}
		}
	}
	conflicts, err = transact(bc.read, bc.commit, keys, fn)
	if errors.Is(err, errAborted) {
		return false, conflicts, nil
	}
	return err == nil, conflicts, err
}

// keysOf returns the keys of a listing.
func keysOf(raw []byte) ([]string, error) {
	var items []struct{ Key string }
	if err := json.Unmarshal(raw, &items); err != nil {
		return nil, fmt.Errorf("listing %s: %v", raw, err)
	}
	var keys []string
	for _, it := range items {
		keys = append(keys, it.Key)
	}
	return keys, nil
}

// httpBank reaches the bank over HTTP.
func httpBank(url, name string) *bankClient {
	list := func() ([]string, error) {
		resp, err := client.Get(url + "/bank/")
		if err != nil {
			return nil, err
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return nil, err
		}
		return keysOf(b)
	}
	read := func(keys []string) ([]*int64, []int64, error) {
		values, revs := make([]*int64, len(keys)), make([]int64, len(keys))
		for i, key := range keys {
			resp, err := client.Get(url + key)
			if err != nil {
				return nil, nil, err
			}
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			switch {
			case err != nil:
				return nil, nil, err
			case resp.StatusCode == 404:
				revs[i] = -1
				continue
			case resp.StatusCode != 200:
				return nil, nil, fmt.Errorf("GET %s: %d %s", key, resp.StatusCode, b)
			}
			v, err := strconv.ParseInt(string(b), 10, 64)
			if err != nil {
				return nil, nil, fmt.Errorf("GET %s: %s", key, b)
			}
			values[i] = &v
			revs[i], _ = strconv.ParseInt(resp.Header.Get("X-Revision"), 10, 64)
		}
		return values, revs, nil
	}
	commit := func(body string) (bool, error) {
		resp, err := client.Post(url+"/", "application/json", strings.NewReader(body))
		if err != nil {
			return false, err
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		switch resp.StatusCode {
		case 200:
			return true, nil
		case 409:
			return false, nil
		}
		return false, fmt.Errorf("POST / %s: %d %s", body, resp.StatusCode, b)
	}
	return &bankClient{list: list, read: read, commit: commit, name: name}
}

// wsPeer is a WebSocket connection a test's goroutine uses (wsClient
// fails the test from its own goroutine only).
type wsPeer struct {
	ws *websocket.Conn
	id int
}

// wsMsg is a message from the server, its payload left raw.
type wsMsg struct {
	Type    string
	Payload json.RawMessage
	ID      json.RawMessage
	raw     string
}

// wsEvent is the payload of a subscription's event.
type wsEvent struct {
	Key      string
	Value    json.RawMessage
	Revision int64
	Seq      int64
	More     bool
	Reason   string
}

func dialPeer(url string) (*wsPeer, error) {
	cfg, err := websocket.NewConfig(strings.Replace(url, "http://", "ws://", 1)+"/", "http://localhost/")
	if err != nil {
		return nil, err
	}
	ws, err := websocket.DialConfig(cfg)
	if err != nil {
		return nil, err
	}
	return &wsPeer{ws: ws}, nil
}

func (p *wsPeer) send(msg string) error { return websocket.Message.Send(p.ws, msg) }

// recv returns the next message; a long silence is a hang, not a
// timing.
func (p *wsPeer) recv() (wsMsg, error) {
	p.ws.SetReadDeadline(time.Now().Add(30 * time.Second))
	var raw string
	if err := websocket.Message.Receive(p.ws, &raw); err != nil {
		return wsMsg{}, err
	}
	m := wsMsg{raw: raw}
	if err := json.Unmarshal([]byte(raw), &m); err != nil {
		return m, fmt.Errorf("%s: %v", raw, err)
	}
	return m, nil
}

// request sends a message of type typ with a fresh id and returns its
// reply, skipping the events that come before it.
func (p *wsPeer) request(typ, payload string) (wsMsg, error) {
	p.id++
	id := strconv.Itoa(p.id)
	if err := p.send(`{"type":"` + typ + `","id":` + id + `,"payload":` + payload + `}`); err != nil {
		return wsMsg{}, err
	}
	for {
		m, err := p.recv()
		if err != nil || string(m.ID) == id {
			return m, err
		}
	}
}

// wsBank reaches the bank over a WebSocket.
func wsBank(p *wsPeer, name string) *bankClient {
	list := func() ([]string, error) {
		m, err := p.request("list", `{"prefix":"/bank/"}`)
		if err != nil {
			return nil, err
		}
		return keysOf(m.Payload)
	}
	read := func(keys []string) ([]*int64, []int64, error) {
		values, revs := make([]*int64, len(keys)), make([]int64, len(keys))
		for i, key := range keys {
			m, err := p.request("get", fmt.Sprintf(`{"key":%q}`, key))
			if err != nil {
				return nil, nil, err
			}
			var ev wsEvent
			json.Unmarshal(m.Payload, &ev)
			switch m.Type {
			case "no-value":
				revs[i] = -1
			case "value":
				v, err := strconv.ParseInt(string(ev.Value), 10, 64)
				if err != nil {
					return nil, nil, fmt.Errorf("get %s: %s", key, m.raw)
				}
				values[i], revs[i] = &v, ev.Revision
			default:
				return nil, nil, fmt.Errorf("get %s: %s", key, m.raw)
			}
		}
		return values, revs, nil
	}
	commit := func(body string) (bool, error) {
		m, err := p.request("txn", body)
		switch {
		case err != nil:
			return false, err
		case m.Type == "ok":
			return true, nil
		case m.Type == "conflict":
			return false, nil
		}
		return false, fmt.Errorf("txn %s: %s", body, m.raw)
	}
	return &bankClient{list: list, read: read, commit: commit, name: name}
}

// ledger is what an observer holds of the accounts.
type ledger map[string]int64

// check returns an error unless l holds the bank's total.
func (l ledger) check(where string) error {
	var sum int64
	for _, v := range l {
		sum += v
	}
	if sum != bankTotal {
		return fmt.Errorf("%s: the accounts hold %d; want %d: %v", where, sum, bankTotal, map[string]int64(l))
	}
	return nil
}

// set applies a value (JSON) or, nil or null, a missing key.
func (l ledger) set(key string, value json.RawMessage) error {
	if value == nil || string(value) == "null" {
		delete(l, key)
		return nil
	}
	v, err := strconv.ParseInt(string(value), 10, 64)
	if err != nil {
		return fmt.Errorf("%s = %s: not an integer", key, value)
	}
	l[key] = v
	return nil
}

// ledgerOf reads a listing's items.
func ledgerOf(raw []byte) (ledger, error) {
	var items []struct {
		Key   string
		Value json.RawMessage
	}
	if err := json.Unmarshal(raw, &items); err != nil {
		return nil, fmt.Errorf("listing %s: %v", raw, err)
	}
	l := ledger{}
	for _, it := range items {
		if err := l.set(it.Key, it.Value); err != nil {
			return nil, err
		}
	}
	return l, nil
}

// sseBlock is one block of an event stream, as EventSource reads it:
// the stream's last event id when the block ends (an id line sets it;
// it stays otherwise), its event name and data.
type sseBlock struct {
	lastID  string
	name    string
	data    string
	hasData bool
}

// readBlocks calls f with each block of an event stream, until f
// returns false or the stream ends.
func readBlocks(r *bufio.Reader, f func(sseBlock) bool) error {
	var b sseBlock
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return err
		}
		line = strings.TrimSuffix(line, "\n")
		switch {
		case strings.HasPrefix(line, "id: "):
			b.lastID = line[4:]
		case strings.HasPrefix(line, "event: "):
			b.name = line[7:]
		case strings.HasPrefix(line, "data: "):
			b.data, b.hasData = line[6:], true
		case line == "":
			if !f(b) {
				return nil
			}
			b = sseBlock{lastID: b.lastID}
		}
	}
}

// openSSE opens an event stream; its body closes with ctx.
func openSSE(ctx context.Context, url string, headers ...string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "text/event-stream")
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err == nil && resp.StatusCode != 200 {
		resp.Body.Close()
		return nil, fmt.Errorf("GET %s: %d", url, resp.StatusCode)
	}
	return resp, err
}

// sseLedger is an SSE client's view of /bank/, applied event by event,
// and checked at every resume point the stream gives it: whenever its
// last event id moves to a seq past the one before (an event inside a
// transaction keeps the id it had). It stops at seq upTo, once known.
type sseLedger struct {
	l       ledger
	fresh   map[string]bool // after a reset, until synced
	lastSeq int64
	synced  bool
	checks  int
	events  int
}

// take applies one block, and returns an error if the stream stands on
// a resume point where the ledger is not whole.
func (s *sseLedger) take(b sseBlock) error {
	if b.hasData {
		switch b.name {
		case "reset":
			s.fresh = map[string]bool{}
		case "synced":
			for key := range s.l {
				if s.fresh != nil && !s.fresh[key] {
					delete(s.l, key)
				}
			}
			s.fresh, s.synced = nil, true
		case "":
			key, _, _, err := splitID(b.lastID)
			if err != nil {
				return err
			}
			if err := s.l.set(key, json.RawMessage(b.data)); err != nil {
				return err
			}
			if s.fresh != nil {
				s.fresh[key] = true
			}
			s.events++
		}
	}
	seq := seqOf(b.lastID)
	if s.synced && seq > s.lastSeq {
		s.checks++
		what := "an event's"
		if !b.hasData {
			what = "a heartbeat's"
		}
		if err := s.l.check(fmt.Sprintf("SSE at %s id %q (the previous at seq %d)", what, b.lastID, s.lastSeq)); err != nil {
			return err
		}
	}
	s.lastSeq = max(s.lastSeq, seq)
	return nil
}

// splitID reads an event id <key>:<revision>:<seq>.
func splitID(id string) (key string, rev, seq int64, err error) {
	fields := strings.Split(id, ":")
	if len(fields) != 3 {
		return "", 0, 0, fmt.Errorf("id %q: want <key>:<revision>:<seq>", id)
	}
	rev, err = strconv.ParseInt(fields[1], 10, 64)
	if err == nil {
		seq, err = strconv.ParseInt(fields[2], 10, 64)
	}
	return strings.NewReplacer("%3A", ":", "%25", "%").Replace(fields[0]), rev, seq, err
}

// wsLedger is a WebSocket client's view of a subscription, applied
// event by event, checked at synced and after every event without
// "more".
type wsLedger struct {
	l      ledger
	fresh  map[string]bool
	synced bool
	seq    int64 // of the last event without "more"
	checks int
	events int
}

// take applies a message of the subscription; done reports a synced.
func (w *wsLedger) take(m wsMsg, prefix string) (done bool, err error) {
	var ev wsEvent
	if err := json.Unmarshal(m.Payload, &ev); err != nil {
		return false, fmt.Errorf("%s: %v", m.raw, err)
	}
	key := ev.Key
	if !strings.HasPrefix(key, "/") {
		key = "/" + key // subscribed KvServer's way
	}
	switch m.Type {
	case "reset":
		w.fresh = map[string]bool{}
		return false, nil
	case "synced":
		for k := range w.l {
			if w.fresh != nil && !w.fresh[k] {
				delete(w.l, k)
			}
		}
		w.fresh, w.synced, w.seq = nil, true, ev.Seq
		w.checks++
		return true, w.l.check(fmt.Sprintf("WebSocket at synced %s", m.raw))
	case "value":
		err = w.l.set(key, ev.Value)
	case "no-value":
		err = w.l.set(key, nil)
	default:
		return false, fmt.Errorf("subscription of %s: unexpected %s", prefix, m.raw)
	}
	if err != nil {
		return false, err
	}
	if w.fresh != nil {
		w.fresh[key] = true
	}
	w.events++
	if w.synced && !ev.More {
		if ev.Seq < w.seq {
			return false, fmt.Errorf("WebSocket: %s after seq %d: a resume point went back", m.raw, w.seq)
		}
		w.seq = ev.Seq
		w.checks++
		return false, w.l.check(fmt.Sprintf("WebSocket after %s", m.raw))
	}
	return false, nil
}

// TestTxnBank: random moves of money between accounts
// (bankClient.move), each a transaction by a Go transact (read, compute,
// commit with checks, again on a conflict), from HTTP clients and
// WebSocket connections at once, while every kind of observer checks
// the total wherever it stands on a whole state: listings (HTTP and
// WebSocket list) on every answer; initial states (SSE ?initial,
// WebSocket subscribe initial) at synced; live subscribers (SSE and
// WebSocket) after every whole transaction: on SSE at every id whose seq
// moves past the last (heartbeat ids included), on the WebSocket after
// every event without "more". Some moves close an account (a delete) or
// open one (a create). At the end, every move applied took one seq, and
// every live subscriber holds exactly the store. In memory and with
// -data.
func TestTxnBank(t *testing.T) {
	t.Run("memory", func(t *testing.T) { bank(t) })
	t.Run("data", func(t *testing.T) { bank(t, "-data", t.TempDir()) })
}

func bank(t *testing.T, args ...string) {
	srv, url := newTestServer(t, append([]string{"-heartbeat", "5ms"}, args...)...)
	var seed []string
	for i := range bankOpen {
		seed = append(seed, fmt.Sprintf(`{"op":"set","key":%q,"value":%d}`, bankKey(i), bankStart))
	}
	if a := postTxn(t, url, `{"ops":[`+strings.Join(seed, ",")+`]}`); a.code != 200 {
		t.Fatalf("seed: %s", a.raw)
	}
	seedSeq := srv.store.published.Load()

	stop := make(chan struct{}) // the transfers are done: observers finish
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var observers, live sync.WaitGroup
	var listings, initials atomic.Int64
	fail := func(err error) {
		if err != nil && ctx.Err() == nil {
			t.Error(err)
		}
	}
	stopped := func() bool {
		select {
		case <-stop:
			return true
		default:
			return false
		}
	}

	// (a) Listings, over HTTP and the WebSocket.
	observers.Add(2)
	go func() {
		defer observers.Done()
		for !stopped() {
			r, err := client.Get(url + "/bank/")
			if err != nil {
				fail(err)
				return
			}
			b, _ := io.ReadAll(r.Body)
			r.Body.Close()
			l, err := ledgerOf(b)
			if err == nil {
				err = l.check("GET /bank/ at X-Seq " + r.Header.Get("X-Seq"))
			}
			fail(err)
			listings.Add(1)
		}
	}()
	go func() {
		defer observers.Done()
		p, err := dialPeer(url)
		if err != nil {
			fail(err)
			return
		}
		defer p.ws.Close()
		for !stopped() {
			m, err := p.request("list", `{"prefix":"/bank/"}`)
			if err != nil {
				fail(err)
				return
			}
			l, err := ledgerOf(m.Payload)
			if err == nil {
				err = l.check("WebSocket list")
			}
			fail(err)
			listings.Add(1)
		}
	}()

	// (b) Initial states, checked at synced.
	observers.Add(2)
	go func() {
		defer observers.Done()
		for !stopped() {
			sctx, scancel := context.WithCancel(ctx)
			resp, err := openSSE(sctx, url+"/bank/?initial")
			if err != nil {
				scancel()
				fail(err)
				return
			}
			s := &sseLedger{l: ledger{}}
			readBlocks(bufio.NewReader(resp.Body), func(b sseBlock) bool {
				if err := s.take(b); err != nil {
					fail(err)
					return false
				}
				return !s.synced
			})
			scancel()
			resp.Body.Close()
			if !s.synced {
				fail(errors.New("SSE ?initial: no synced"))
				return
			}
			initials.Add(1)
		}
	}()
	go func() {
		defer observers.Done()
		p, err := dialPeer(url)
		if err != nil {
			fail(err)
			return
		}
		defer p.ws.Close()
		for !stopped() {
			w := &wsLedger{l: ledger{}}
			if m, err := p.request("subscribe", `{"key":"/bank/","initial":true}`); err != nil || m.Type != "ok" {
				fail(fmt.Errorf("subscribe: %v %s", err, m.raw))
				return
			}
			for done := false; !done; {
				m, err := p.recv()
				if err == nil {
					done, err = w.take(m, "/bank/")
				}
				if err != nil {
					fail(err)
					return
				}
			}
			// Live events may come before the unsubscribe's ok, none after.
			if m, err := p.request("unsubscribe", `{"key":"/bank/"}`); err != nil || m.Type != "ok" {
				fail(fmt.Errorf("unsubscribe: %v %s", err, m.raw))
				return
			}
			initials.Add(1)
		}
	}()

	// (c) Live subscribers, to the end.
	final := make(chan int64, 2) // the last change's seq, once the transfers are done
	var sseLive *sseLedger
	var wsLive *wsLedger
	live.Add(2)
	resp, err := openSSE(ctx, url+"/bank/?initial")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		defer live.Done()
		defer resp.Body.Close()
		s := &sseLedger{l: ledger{}}
		sseLive = s
		upTo := int64(-1)
		readBlocks(bufio.NewReader(resp.Body), func(b sseBlock) bool {
			if err := s.take(b); err != nil {
				fail(err)
				return false
			}
			if upTo < 0 {
				select {
				case upTo = <-final:
				default:
				}
			}
			return upTo < 0 || s.lastSeq < upTo
		})
	}()
	p, err := dialPeer(url)
	if err != nil {
		t.Fatal(err)
	}
	defer p.ws.Close()
	if m, err := p.request("subscribe", `{"key":"bank/","initial":true}`); err != nil || m.Type != "ok" {
		t.Fatalf("subscribe: %v %s", err, m.raw)
	}
	go func() {
		defer live.Done()
		w := &wsLedger{l: ledger{}}
		wsLive = w
		upTo := int64(-1)
		for upTo < 0 || w.seq < upTo {
			m, err := p.recv()
			if err == nil && m.ID == nil { // a reply is the wake-up below
				_, err = w.take(m, "bank/")
			}
			if err != nil {
				fail(err)
				return
			}
			if upTo < 0 {
				select {
				case upTo = <-final:
				default:
				}
			}
		}
	}()

	// The transfers: 3 HTTP clients and 2 WebSocket connections.
	const perClient = 50
	var transfers, conflicts, aborted atomic.Int64
	var writers sync.WaitGroup
	for c := range 5 {
		writers.Add(1)
		go func() {
			defer writers.Done()
			name := strconv.Itoa(c)
			bc := httpBank(url, name)
			if c >= 3 {
				p, err := dialPeer(url)
				if err != nil {
					fail(err)
					return
				}
				defer p.ws.Close()
				bc = wsBank(p, name)
			}
			rnd := rand.New(rand.NewPCG(uint64(c), 7))
			for range perClient {
				applied, n, err := bc.move(rnd)
				conflicts.Add(int64(n))
				switch {
				case err != nil:
					fail(err)
					return
				case applied:
					transfers.Add(1)
				default:
					aborted.Add(1)
				}
			}
		}()
	}
	writers.Wait()
	close(stop)
	observers.Wait()

	raw, seq := bankEnd(t, url)
	final <- seq
	final <- seq
	// The WebSocket subscriber may be waiting for a message already: a
	// reply wakes it to find it has come to the end.
	if err := p.send(`{"type":"get","id":"wake","payload":{"key":"/none"}}`); err != nil {
		t.Error(err)
	}
	live.Wait()
	cancel()
	want, err := ledgerOf([]byte(raw))
	if err != nil {
		t.Fatal(err)
	}
	if err := want.check("the store at the end"); err != nil {
		t.Error(err)
	}
	if got := seq - seedSeq; got != transfers.Load()+1 {
		t.Errorf("%d moves applied, and the end; the change sequence moved %d: one seq each", transfers.Load(), got)
	}
	for name, got := range map[string]ledger{"SSE": sseLive.l, "WebSocket": wsLive.l} {
		if !sameLedger(got, want) {
			t.Errorf("%s subscriber at the end: %v; the store %v", name, got, want)
		}
	}
	if transfers.Load() == 0 || listings.Load() == 0 || initials.Load() == 0 || sseLive.checks == 0 || wsLive.checks == 0 {
		t.Errorf("nothing to check: %d moves, %d listings, %d initial states, %d and %d live checks",
			transfers.Load(), listings.Load(), initials.Load(), sseLive.checks, wsLive.checks)
	}
	t.Logf("%d moves (%d conflicts retried, %d aborted on a closed account); %d listings and %d initial states checked; live: SSE %d events, %d checks; WebSocket %d events, %d checks",
		transfers.Load(), conflicts.Load(), aborted.Load(), listings.Load(), initials.Load(), sseLive.events, sseLive.checks, wsLive.events, wsLive.checks)
}

// bankEnd writes /bank/end, 0, the last change, on every stream of
// /bank/, and returns the listing of /bank/ and its X-Seq: the seq of
// that change, where subscribers come to the end.
func bankEnd(t *testing.T, url string) (raw string, seq int64) {
	t.Helper()
	if r := do(t, "POST", url+"/bank/end", "0"); r.code != 200 {
		t.Fatalf("POST /bank/end: %d %s", r.code, r.body)
	}
	r := do(t, "GET", url+"/bank/", "")
	seq, err := strconv.ParseInt(r.header.Get("X-Seq"), 10, 64)
	if r.code != 200 || err != nil {
		t.Fatalf("GET /bank/: %d %s, X-Seq %q", r.code, r.body, r.header.Get("X-Seq"))
	}
	return r.body, seq
}

func sameLedger(a, b ledger) bool {
	if len(a) != len(b) {
		return false
	}
	keys := make([]string, 0, len(a))
	for k := range a {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if v, ok := b[k]; !ok || v != a[k] {
			return false
		}
	}
	return true
}
