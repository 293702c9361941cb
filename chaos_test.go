package main

// Chaos under load (SPEC 12, "Failures", all at once): the cluster recipe
// of deploy/cluster (three etcd members, two AtomKV nodes, the real
// binary) under clients that write, read and follow the keyspace through
// both nodes, while etcd members (the leader among them) and nodes are
// killed with SIGKILL and started again, one at a time. etcd's own
// history of the run is the judge afterwards: every write is in it as
// its answer said (once, or not at all for a 503 whose outcome is
// unknown), each group of keys' history of operations is linearizable,
// and every follower, through its reconnects, holds the store.

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// chaosSize is how much a chaos run does: modest by default, so that CI
// runs it on a shared 2-core machine; more with ATOMKV_LOAD=1.
type chaosSize struct {
	run       time.Duration // how long faults go on (at least one of each kind)
	dwell     int           // writes acknowledged while a fault lasts, and after
	groups    int           // groups of linKeys keys, each checked on its own
	perGroup  int           // HTTP clients per group
	movers    int           // bank movers: half over HTTP, half over a WebSocket
	followers int           // followers of the whole keyspace: half event streams, half WebSockets
}

func chaosSizeOf() chaosSize {
	if os.Getenv("ATOMKV_LOAD") != "" {
		return chaosSize{run: 2 * time.Minute, dwell: 400, groups: 8, perGroup: 3, movers: 4, followers: 8}
	}
	return chaosSize{run: 20 * time.Second, dwell: 150, groups: 4, perGroup: 2, movers: 2, followers: 4}
}

// chaosKey is key k of group g.
func chaosKey(g, k int) string { return fmt.Sprintf("/chaos/%d/%d", g, k) }

// chaosEnd is the key written once the run is over: a follower that has
// its event holds every change before it.
const chaosEnd = "/chaos-end"

// chaosRun is what a run's clients share and record.
type chaosRun struct {
	start  time.Time
	nodes  []string     // the nodes' URLs, which a restart keeps
	values atomic.Int64 // the last value handed out: each write's are its own

	mu       sync.Mutex
	acks     []time.Duration // when each applied write was acknowledged, since start
	ops      [][]*chaosOp    // by group
	problems []string        // answers no failure explains
}

func (run *chaosRun) since() time.Duration { return time.Since(run.start) }

// acked records an applied write's acknowledgement.
func (run *chaosRun) acked() {
	at := run.since()
	run.mu.Lock()
	run.acks = append(run.acks, at)
	run.mu.Unlock()
}

func (run *chaosRun) ackCount() int {
	run.mu.Lock()
	defer run.mu.Unlock()
	return len(run.acks)
}

func (run *chaosRun) problem(format string, args ...any) {
	run.mu.Lock()
	run.problems = append(run.problems, fmt.Sprintf("%.3fs: ", run.since().Seconds())+fmt.Sprintf(format, args...))
	run.mu.Unlock()
}

// failed sorts a failed request's error: one a fault explains (the node
// died or refused, or etcd could not be reached, which every 503 of a
// node says), or a problem.
func (run *chaosRun) failed(what string, err error) {
	var netErr net.Error
	var dialErr *websocket.DialError
	if errors.As(err, &dialErr) {
		err = dialErr.Err // which it does not unwrap
	}
	switch {
	case errors.As(err, &netErr), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.EPIPE),
		strings.Contains(err.Error(), "etcd"):
	default:
		run.problem("%s: %v", what, err)
	}
}

// chaosOutcome is what a client knows of its operation.
type chaosOutcome uint8

const (
	answered   chaosOutcome = iota // the answer says
	notApplied                     // refused, or 503 "nothing was applied"; a read that failed
	unknown                        // 503 "its outcome is unknown", or no answer
	committed                      // 503: etcd committed it, the node did not see it in time
)

func (o chaosOutcome) String() string {
	return [...]string{"answered", "not applied", "unknown", "committed"}[o]
}

// chaosOp is one operation of a group's history, with its outcome.
type chaosOp struct {
	kvOp
	group   int
	outcome chaosOutcome
	answer  string // the request and what came back, for messages
	seq     int64  // an applied transaction's
}

// sets returns the values the operation writes, in its writes' order for
// a transaction (0 for a delete).
func (o *chaosOp) sets() []int64 {
	switch o.kind {
	case linSet, linCAS:
		return []int64{o.value}
	case linTxn:
		var v []int64
		for _, w := range o.writes {
			if w.del {
				v = append(v, 0)
			} else {
				v = append(v, w.value)
			}
		}
		return v
	}
	return nil
}

// chaosClient does random operations on its group's keys, each through a
// node picked at random.
type chaosClient struct {
	run   *chaosRun
	group int
	id    int
	rnd   *rand.Rand
	http  *http.Client
	seen  linWorkload // the revisions it last saw of its keys
	avoid int         // a node that refused it, skipped next (-1: none)
}

func (c *chaosClient) loop(ctx context.Context) {
	for ctx.Err() == nil {
		o := c.next()
		c.send(o)
		c.run.mu.Lock()
		c.run.ops[c.group] = append(c.run.ops[c.group], o)
		c.run.mu.Unlock()
	}
}

// next is a random operation: a read, a set, a compare-and-swap against
// the revision last seen, a delete, or a transaction that checks some
// keys and sets or deletes some (its first op a set, whose value tells
// it in etcd's history). Values are unique in the run.
func (c *chaosClient) next() *chaosOp {
	v := c.run.values.Add(1) * 10
	o := &chaosOp{group: c.group, kvOp: kvOp{client: c.id, key: c.rnd.IntN(linKeys), value: v}}
	switch r := c.rnd.IntN(20); {
	case r < 7:
		o.kind = linGet
	case r < 10:
		o.kind = linSet
	case r < 13:
		o.kind = linCAS
		o.rev = c.seen.seen[o.key] + 1
	case r < 14:
		o.kind = linDelete
	default:
		o.kind = linTxn
		keys := c.rnd.Perm(linKeys)
		for _, k := range keys[:c.rnd.IntN(3)] {
			o.checks = append(o.checks, linCheck{k, c.seen.seen[k]})
		}
		for i, k := range keys[:1+c.rnd.IntN(linKeys)] {
			o.writes = append(o.writes, linWrite{key: k, del: i > 0 && c.rnd.IntN(3) == 0, value: v + int64(i)})
		}
	}
	return o
}

// send does o on a node, and records what came back.
func (c *chaosClient) send(o *chaosOp) {
	n := c.rnd.IntN(len(c.run.nodes))
	if n == c.avoid {
		n = (n + 1) % len(c.run.nodes)
	}
	c.avoid = -1
	key := chaosKey(o.group, o.key)
	var method, path, body string
	var revision string
	switch o.kind {
	case linGet:
		method, path = "GET", key
	case linSet:
		method, path, body = "POST", key, strconv.FormatInt(o.value, 10)
	case linCAS:
		method, path, body, revision = "PUT", key, strconv.FormatInt(o.value, 10), strconv.FormatInt(o.rev, 10)
	case linDelete:
		method, path = "DELETE", key
	case linTxn:
		method, path, body = "POST", "/", chaosTxnBody(o)
	}
	req, err := http.NewRequest(method, c.run.nodes[n]+path, strings.NewReader(body))
	if err != nil {
		panic(err)
	}
	if revision != "" {
		req.Header.Set("X-Revision", revision)
	}
	o.answer = fmt.Sprintf("%s %s %s on node %d: ", method, path, body, n+1)
	o.call = int64(c.run.since())
	resp, err := c.http.Do(req)
	var b []byte
	if err == nil {
		b, err = io.ReadAll(resp.Body)
		resp.Body.Close()
	}
	o.ret = int64(c.run.since())
	if err != nil {
		o.answer += err.Error()
		o.outcome = unknown
		if errors.Is(err, syscall.ECONNREFUSED) {
			o.outcome, c.avoid = notApplied, n // the node is down: nothing was sent
		}
		return
	}
	o.answer += fmt.Sprintf("%d %s", resp.StatusCode, b)
	if resp.StatusCode == 503 {
		switch msg := string(b); {
		case strings.Contains(msg, "nothing was applied"), o.kind == linGet && strings.Contains(msg, "etcd is out of reach"):
			o.outcome = notApplied
		case strings.Contains(msg, "outcome is unknown"):
			o.outcome = unknown
		case strings.Contains(msg, "etcd committed the write"):
			o.outcome = committed
		default:
			o.outcome = unknown
			c.run.problem("%s: a 503 that does not say whether it was applied", o.answer)
		}
		return
	}
	rev, _ := strconv.ParseInt(resp.Header.Get("X-Revision"), 10, 64)
	o.outcome = answered
	code := resp.StatusCode
	switch {
	case o.kind == linGet && code == 404:
		o.read = linVal{}
	case o.kind == linGet && code == 200:
		o.read, err = linValOf(b, rev)
	case o.kind == linSet && code == 200:
		o.newRev = rev
	case o.kind == linCAS && code == 200:
		o.ok, o.newRev = true, rev
	case o.kind == linCAS && code == 409:
		o.read, err = linValOf(b, rev)
	case o.kind == linDelete && code == 200:
		var d struct{ Deleted bool }
		err = json.Unmarshal(b, &d)
		o.existed = int8(btoi(d.Deleted))
	case o.kind == linTxn && (code == 200 || code == 409):
		err = chaosTxnAnswer(o, code == 200, b)
	default:
		err = errors.New("unexpected answer")
	}
	if err != nil {
		o.outcome = unknown
		c.run.problem("%s: %v", o.answer, err)
		return
	}
	c.seen.saw(&o.kvOp)
	if o.kind == linSet || o.kind == linDelete || o.ok {
		c.run.acked()
	}
}

// chaosTxnBody is a transaction's body, with its group's keys.
func chaosTxnBody(o *chaosOp) string {
	var checks, ops []string
	for _, c := range o.checks {
		checks = append(checks, fmt.Sprintf(`{"key":%q,"revision":%d}`, chaosKey(o.group, c.key), c.rev))
	}
	for _, w := range o.writes {
		if w.del {
			ops = append(ops, fmt.Sprintf(`{"op":"delete","key":%q}`, chaosKey(o.group, w.key)))
		} else {
			ops = append(ops, fmt.Sprintf(`{"op":"set","key":%q,"value":%d}`, chaosKey(o.group, w.key), w.value))
		}
	}
	return `{"check":[` + strings.Join(checks, ",") + `],"ops":[` + strings.Join(ops, ",") + `]}`
}

// chaosTxnAnswer reads a transaction's answer, as linTxnAnswer does, on
// the keys of the op's group.
func chaosTxnAnswer(o *chaosOp, applied bool, b []byte) (err error) {
	o.seq, err = readTxnAnswer(&o.kvOp, applied, b, func(k int) string { return chaosKey(o.group, k) })
	return err
}

// moveHTTP moves money in the bank (bank_test.go's moves, each a Go
// transact) over HTTP, each move through a node picked at random.
func (run *chaosRun) moveHTTP(ctx context.Context, id int) {
	rnd := rand.New(rand.NewPCG(uint64(id), uint64(time.Now().UnixNano())))
	var banks []*bankClient
	for n, url := range run.nodes {
		banks = append(banks, httpBank(url, fmt.Sprintf("h%d-%d", id, n)))
	}
	for ctx.Err() == nil {
		applied, _, err := banks[rnd.IntN(len(banks))].move(rnd)
		if applied {
			run.acked()
		}
		if err != nil {
			run.failed("a bank move over HTTP", err)
		}
	}
}

// moveWS moves money over a WebSocket to a node picked at random, and
// after a failure over a new one.
func (run *chaosRun) moveWS(ctx context.Context, id int) {
	rnd := rand.New(rand.NewPCG(uint64(id), uint64(time.Now().UnixNano())))
	var p *wsPeer
	var bank *bankClient
	n := rnd.IntN(len(run.nodes))
	for conns := 0; ctx.Err() == nil; {
		if p == nil {
			var err error
			if p, err = dialPeer(run.nodes[n]); err != nil {
				run.failed("dialing a WebSocket", err)
				n = (n + 1) % len(run.nodes)      // the other node, next
				time.Sleep(20 * time.Millisecond) // a client's backoff
				continue
			}
			conns++
			bank = wsBank(p, fmt.Sprintf("w%d-%d", id, conns))
		}
		applied, _, err := bank.move(rnd)
		if applied {
			run.acked()
		}
		if err != nil {
			run.failed("a bank move over a WebSocket", err)
			p.ws.Close()
			p, n = nil, rnd.IntN(len(run.nodes))
		}
	}
	if p != nil {
		p.ws.Close()
	}
}

// A chaosFollower follows the whole keyspace over an event stream or a
// WebSocket subscription, as a client does: when its connection ends it
// opens another, to a node picked at random, from its last resume point
// (Last-Event-ID, since). It checks the bank's total wherever it stands
// on a resume point (SPEC 11: every transaction whole there).
type chaosFollower struct {
	run  *chaosRun
	name string
	ws   bool
	rnd  *rand.Rand
	node int // the node it connects to next

	mu          sync.Mutex
	view        map[string]string
	changes     []got // every change it got
	live        bool  // synced on the connection open now
	connections int
	resets      int
	resumed     []time.Duration // from a connection's end to the next one's synced
	down        time.Time       // when the last connection ended
	end         string          // chaosEnd's value, once it came
}

// take applies a change (rev -1: missing); fresh, after a reset, notes
// the keys its state holds.
func (f *chaosFollower) take(g got, fresh map[string]bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if g.rev < 0 {
		delete(f.view, g.key)
	} else {
		f.view[g.key] = g.value
	}
	if fresh != nil {
		fresh[g.key] = true
	}
	if g.key == chaosEnd {
		f.end = g.value
	}
	f.changes = append(f.changes, g)
}

// synced ends a state: after a reset, the keys it did not hold go.
func (f *chaosFollower) synced(fresh map[string]bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if fresh != nil {
		for k := range f.view {
			if !fresh[k] {
				delete(f.view, k)
			}
		}
	}
	f.live = true
	if !f.down.IsZero() {
		f.resumed = append(f.resumed, time.Since(f.down))
		f.down = time.Time{}
	}
}

// ended records that the connection ended (or never opened).
func (f *chaosFollower) ended() {
	f.mu.Lock()
	if f.live || f.down.IsZero() {
		f.down = time.Now()
	}
	f.live = false
	f.mu.Unlock()
}

func (f *chaosFollower) reset() {
	f.mu.Lock()
	f.resets++
	f.mu.Unlock()
	f.run.problem("%s got a reset (etcd compacted nothing)", f.name)
}

// checkBank checks the bank's total in the view, at a resume point.
func (f *chaosFollower) checkBank(at string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var sum int64
	for k, v := range f.view {
		if strings.HasPrefix(k, "/bank/") {
			n, _ := strconv.ParseInt(v, 10, 64)
			sum += n
		}
	}
	if sum != bankTotal {
		f.run.problem("%s at %s: the accounts hold %d; want %d", f.name, at, sum, bankTotal)
	}
}

func (f *chaosFollower) follow(ctx context.Context) {
	f.view = map[string]string{}
	f.node = f.rnd.IntN(len(f.run.nodes))
	if f.ws {
		f.followWS(ctx)
	} else {
		f.followSSE(ctx)
	}
}

func (f *chaosFollower) followSSE(ctx context.Context) {
	lastID := ""
	for ctx.Err() == nil {
		f.mu.Lock()
		f.connections++
		f.mu.Unlock()
		var headers []string
		if lastID != "" {
			headers = []string{"Last-Event-ID", lastID}
		}
		resp, err := openSSE(ctx, f.run.nodes[f.node]+"/?initial", headers...)
		if err != nil {
			f.ended()
			f.node = (f.node + 1) % len(f.run.nodes)
			if ctx.Err() == nil && !strings.Contains(err.Error(), ": 503") {
				f.run.failed(f.name+" opening its stream", err)
			}
			time.Sleep(20 * time.Millisecond) // a client's backoff
			continue
		}
		var fresh map[string]bool
		synced, lastSeq := false, seqOf(lastID)
		readBlocks(bufio.NewReader(resp.Body), func(b sseBlock) bool {
			if b.lastID != "" {
				lastID = b.lastID
			}
			seq := seqOf(b.lastID)
			switch {
			case !b.hasData:
			case b.name == "reset":
				f.reset()
				fresh = map[string]bool{}
			case b.name == "synced":
				f.synced(fresh)
				fresh, synced = nil, true
				f.checkBank("synced " + b.lastID)
			case b.name == "":
				key, rev, _, err := splitID(b.lastID)
				if err != nil {
					f.run.problem("%s: %v", f.name, err)
					return false
				}
				f.take(got{key: key, value: b.data, rev: rev, seq: seq}, fresh)
			default:
				f.run.problem("%s: an event %q", f.name, b.name)
			}
			if synced && b.name != "synced" && seq > lastSeq {
				f.checkBank("id " + b.lastID)
			}
			lastSeq = max(lastSeq, seq)
			return true
		})
		resp.Body.Close()
		f.ended()
		f.node = f.rnd.IntN(len(f.run.nodes))
	}
}

func (f *chaosFollower) followWS(ctx context.Context) {
	since := int64(-1)
	for ctx.Err() == nil {
		f.mu.Lock()
		f.connections++
		f.mu.Unlock()
		p, err := dialPeer(f.run.nodes[f.node])
		if err != nil {
			f.ended()
			f.node = (f.node + 1) % len(f.run.nodes)
			f.run.failed(f.name+" dialing", err)
			time.Sleep(20 * time.Millisecond) // a client's backoff
			continue
		}
		stop := context.AfterFunc(ctx, func() { p.ws.Close() })
		sub := `{"type":"subscribe","id":1,"payload":{"key":"/","initial":true}}`
		if since >= 0 {
			sub = `{"type":"subscribe","id":1,"payload":{"key":"/","since":` + strconv.FormatInt(since, 10) + `}}`
		}
		var fresh map[string]bool
		synced := false
		for err := p.send(sub); err == nil; {
			var m wsMsg
			if m, err = p.recv(); err != nil {
				break
			}
			var ev wsEvent
			json.Unmarshal(m.Payload, &ev)
			switch m.Type {
			case "ok":
			case "error":
				if !strings.Contains(m.raw, "etcd") {
					f.run.problem("%s: %s", f.name, m.raw)
				}
				err = errors.New(m.raw)
			case "reset":
				f.reset()
				fresh = map[string]bool{}
			case "synced":
				f.synced(fresh)
				fresh, synced, since = nil, true, ev.Seq
				f.checkBank("synced " + m.raw)
			case "value", "no-value":
				g := got{key: ev.Key, value: string(ev.Value), rev: ev.Revision, seq: ev.Seq}
				if m.Type == "no-value" {
					g.value, g.rev = "null", -1
				}
				f.take(g, fresh)
				since = ev.Seq
				if synced && !ev.More {
					f.checkBank(m.raw)
				}
			default:
				f.run.problem("%s: %s", f.name, m.raw)
			}
		}
		stop()
		p.ws.Close()
		f.ended()
		f.node = f.rnd.IntN(len(f.run.nodes))
	}
}

// A chaosFault is one failure the run made, and its end.
type chaosFault struct {
	kind           string // "etcd leader", "etcd follower", "AtomKV node"
	what           string // which
	killed, healed time.Duration
}

// TestClusterChaos: the cluster recipe under load and failures (see the
// file's comment). Writers on groups of three keys (GET, POST, PUT,
// DELETE, transactions with checks) and bank movers (Go transacts, over
// HTTP and WebSockets) go through both nodes, followers (event streams,
// WebSockets) follow the keyspace, while the etcd leader, an etcd
// follower and each node in turn are killed (SIGKILL) and started again,
// each failure lasting while writes go on and every follower has
// resumed. Afterwards, against etcd's history of the run:
//
//   - every write acknowledged is in it once, at the revision answered; a
//     conflict or a 503 "nothing was applied" (or a refused connection)
//     is not; a 503 "its outcome is unknown" (or a connection lost) is in
//     it once or not at all; a 503 "etcd committed the write" is in it;
//   - each group's history, each write whose outcome was unknown taken as
//     etcd's history says, is linearizable (linearize_test.go's checker);
//   - every follower resumed without a reset, saw whole transactions at
//     every resume point (the bank's total), got only versions etcd had,
//     and holds what both nodes list; the bank holds its total.
//
// It reports, without asserting anything of them, writes acknowledged
// per second and the longest time without one after each kill
// (docs/performance.md). ATOMKV_LOAD=1 runs it longer, with more clients.
func TestClusterChaos(t *testing.T) {
	size := chaosSizeOf()
	r := startClusterRecipe(t)
	run := &chaosRun{ops: make([][]*chaosOp, size.groups)}
	for _, n := range r.nodes {
		run.nodes = append(run.nodes, "http://"+flagValue(n.args, "-addr"))
	}
	var open []string
	for i := range bankOpen {
		open = append(open, fmt.Sprintf(`{"op":"set","key":%q,"value":%d}`, bankKey(i), bankStart))
	}
	mustDo(t, 200, "POST", run.nodes[0]+"/", `{"ops":[`+strings.Join(open, ",")+`]}`)

	run.start = time.Now()
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	var workers sync.WaitGroup
	for g := range size.groups {
		for i := range size.perGroup {
			c := &chaosClient{
				run: run, group: g, id: g*size.perGroup + i, avoid: -1,
				rnd: rand.New(rand.NewPCG(uint64(g), uint64(time.Now().UnixNano()+int64(i)))),
				// The timeout is a hang breaker: a node answers within
				// -write-timeout.
				http: &http.Client{Timeout: time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: 4}},
				seen: linWorkload{seen: [linKeys]int64{-1, -1, -1}},
			}
			workers.Go(func() { c.loop(ctx) })
		}
	}
	for i := range size.movers {
		if i%2 == 0 {
			workers.Go(func() { run.moveHTTP(ctx, i) })
		} else {
			workers.Go(func() { run.moveWS(ctx, i) })
		}
	}
	followCtx, stopFollowing := context.WithCancel(context.Background())
	defer stopFollowing()
	var following sync.WaitGroup
	var followers []*chaosFollower
	for i := range size.followers {
		f := &chaosFollower{run: run, ws: i%2 == 1, rnd: rand.New(rand.NewPCG(uint64(i), 7))}
		f.name = fmt.Sprintf("event stream %d", i/2+1)
		if f.ws {
			f.name = fmt.Sprintf("WebSocket %d", i/2+1)
		}
		followers = append(followers, f)
		following.Go(func() { f.follow(followCtx) })
	}
	allLive := func() bool {
		for _, f := range followers {
			f.mu.Lock()
			live := f.live
			f.mu.Unlock()
			if !live {
				return false
			}
		}
		return true
	}
	// settle waits for writes acknowledged, and every follower on a
	// connection that has synced: a hang breaker, not a timing assertion.
	settle := func(what string) {
		t.Helper()
		want := run.ackCount() + size.dwell
		deadline := time.Now().Add(time.Minute)
		for run.ackCount() < want || !allLive() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: %d writes acknowledged of %d, followers live: %v, after a minute", what, run.ackCount(), want, allLive())
			}
			time.Sleep(10 * time.Millisecond) // between polls
		}
	}
	settle("the start")

	var faults []chaosFault
	kinds := []string{"etcd leader", "AtomKV node", "etcd follower", "AtomKV node"}
	for i := 0; i < len(kinds) || run.since() < size.run; i++ {
		f := chaosFault{kind: kinds[i%len(kinds)]}
		var heal func()
		switch f.kind {
		case "AtomKV node":
			n := (i / 2) % len(r.nodes)
			f.what = r.nodes[n].name
			r.kill(t, n)
			heal = func() { r.start(t, n) }
		default:
			m := r.etcd.leader()
			if f.kind == "etcd follower" {
				m = (m + 1) % len(r.etcd.members)
			}
			f.what = r.etcd.members[m].name
			r.etcd.kill(m)
			heal = func() { r.etcd.start(m) }
		}
		f.killed = run.since()
		settle(f.kind + " " + f.what + " killed")
		heal()
		f.healed = run.since()
		t.Logf("%.1fs: %s %s killed (kill -9), started again at %.1fs", f.killed.Seconds(), f.kind, f.what, f.healed.Seconds())
		faults = append(faults, f)
		settle(f.kind + " " + f.what + " started again")
	}
	stop()
	workers.Wait()
	ran := run.since()

	// Every follower gets the last change, and holds what the nodes list.
	token := strconv.FormatInt(time.Now().UnixNano(), 10)
	mustDo(t, 200, "POST", run.nodes[0]+chaosEnd, token)
	waitFor(t, "every follower to get the last change", func() bool {
		for _, f := range followers {
			f.mu.Lock()
			end := f.end
			f.mu.Unlock()
			if end != token {
				return false
			}
		}
		return true
	})
	stopFollowing()
	following.Wait()
	var store map[string]string
	for i, url := range run.nodes {
		items := map[string]string{}
		var listed []listedItem
		if err := json.Unmarshal([]byte(mustDo(t, 200, "GET", url+"/", "", "Accept", "application/json").body), &listed); err != nil {
			t.Fatal(err)
		}
		for _, it := range listed {
			items[it.Key] = string(it.Value)
		}
		if store == nil {
			store = items
		} else if !mapsEqual(items, store) {
			t.Errorf("node %d lists %d keys; node 1 %d: want the same", i+1, len(items), len(store))
		}
	}
	var bank int64
	for k, v := range store {
		if strings.HasPrefix(k, "/bank/") {
			n, _ := strconv.ParseInt(v, 10, 64)
			bank += n
		}
	}
	if bank != bankTotal {
		t.Errorf("the bank holds %d; want %d", bank, bankTotal)
	}
	for _, f := range followers {
		if !mapsEqual(f.view, store) {
			t.Errorf("%s holds %d keys, not what the nodes list (%d keys): %s", f.name, len(f.view), len(store), viewDiff(f.view, store))
		}
	}

	history := etcdHistory(t, r.etcd.newClient(), "/atomkv")
	checkFollowed(t, followers, history)
	checkChaosWrites(t, run, history)
	for i, p := range run.problems {
		if i == 20 {
			t.Errorf("… and %d more", len(run.problems)-i)
			break
		}
		t.Error(p)
	}
	reportChaos(t, run, faults, followers, ran)
}

// viewDiff says how a view differs from the store, a few keys of it.
func viewDiff(view, store map[string]string) string {
	var diff []string
	for k, v := range store {
		if view[k] != v {
			diff = append(diff, fmt.Sprintf("%s=%s (holds %q)", k, v, view[k]))
		}
	}
	for k, v := range view {
		if _, ok := store[k]; !ok {
			diff = append(diff, fmt.Sprintf("%s missing (holds %s)", k, v))
		}
	}
	slices.Sort(diff)
	return strings.Join(diff[:min(len(diff), 10)], ", ")
}

// etcdVersion is a version of a key in etcd's history.
type etcdVersion struct {
	key           string
	value         string
	revision, seq int64 // AtomKV's revision (version - 1), and etcd's
}

// chaosHistory is etcd's history of the run, under the prefix.
type chaosHistory struct {
	byValue  map[string][]etcdVersion // the versions of the group keys, by value: each is unique
	versions map[etcdVersion]bool     // every AtomKV key's versions (seq 0)
	deleted  map[string]int           // deletes, by key
	changes  int
}

// etcdHistory reads etcd's whole history under prefix (every revision
// since the first: the run is shorter than any compaction), to a key it
// puts there last.
func etcdHistory(t *testing.T, c *etcdClient, prefix string) chaosHistory {
	t.Helper()
	last := etcdPutAll(t, c, prefix+"/\x00history-end", "")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute) // a hang breaker
	defer cancel()
	key := []byte(prefix + "/")
	w, err := c.watch(ctx, etcdWatchCreate{Key: key, RangeEnd: etcdPrefixEnd(key), StartRevision: 1})
	if err != nil {
		t.Fatalf("watching etcd's history: %v", err)
	}
	stop := context.AfterFunc(ctx, func() { w.Close() })
	defer stop()
	defer w.Close()
	h := chaosHistory{byValue: map[string][]etcdVersion{}, versions: map[etcdVersion]bool{}, deleted: map[string]int{}}
	for rev := int64(0); rev < last; {
		r, err := w.next()
		if err != nil {
			t.Fatalf("etcd's history after revision %d of %d: %v", rev, last, err)
		}
		for _, ev := range r.Events {
			rev = ev.KV.ModRevision
			k, ok := strings.CutPrefix(string(ev.KV.Key), prefix)
			if !ok || strings.HasPrefix(k, "/\x00") {
				continue // a fence, an expiry's marker
			}
			h.changes++
			if ev.Type == "DELETE" {
				h.deleted[k]++
				continue
			}
			value, _ := decodeEtcdValue(ev.KV.Value)
			v := etcdVersion{key: k, value: value, revision: ev.KV.Version - 1}
			h.versions[v] = true
			if strings.HasPrefix(k, "/chaos/") {
				v.seq = ev.KV.ModRevision
				h.byValue[value] = append(h.byValue[value], v)
			}
		}
	}
	return h
}

// checkFollowed checks that every change a follower got is a version
// etcd had: a key's value at its revision, or a delete of a key etcd
// deleted.
func checkFollowed(t *testing.T, followers []*chaosFollower, h chaosHistory) {
	t.Helper()
	for _, f := range followers {
		bad := 0
		for _, g := range f.changes {
			ok := h.deleted[g.key] > 0
			if g.rev >= 0 {
				ok = h.versions[etcdVersion{key: g.key, value: g.value, revision: g.rev}] || g.key == chaosEnd
			}
			if !ok {
				if bad++; bad <= 5 {
					t.Errorf("%s got %s, a version etcd never had", f.name, g)
				}
			}
		}
	}
}

// checkChaosWrites checks every write of the groups against etcd's
// history, takes each write whose outcome was unknown as the history
// says, and checks each group's history for linearizability.
func checkChaosWrites(t *testing.T, run *chaosRun, h chaosHistory) {
	t.Helper()
	counts := map[string]int{}
	for g, ops := range run.ops {
		var history []kvOp
		var ambiguous []kvOp // deletes whose outcome is unknown: etcd's history cannot tell them apart
		for _, o := range ops {
			counts[o.outcome.String()]++
			if o.kind == linGet || o.kind == linDelete {
				switch {
				case o.outcome == answered:
					history = append(history, o.kvOp)
				case o.kind == linDelete && o.outcome == committed:
					o.existed = -1
					history = append(history, o.kvOp)
				case o.kind == linDelete && o.outcome == unknown:
					o.existed, o.ret = -1, math.MaxInt64
					ambiguous = append(ambiguous, o.kvOp)
				}
				continue
			}
			applied, err := chaosApplied(o, h)
			if err != nil {
				t.Errorf("%s: %v", o.answer, err)
				continue
			}
			switch {
			case o.outcome == answered && (o.kind == linSet || o.ok) && !applied:
				t.Errorf("%s: acknowledged, and not in etcd's history", o.answer)
			case o.outcome == answered && applied && !(o.kind == linSet || o.ok):
				t.Errorf("%s: a conflict, and in etcd's history: %v", o.answer, h.byValue[strconv.FormatInt(o.value, 10)])
			case o.outcome == notApplied && applied:
				t.Errorf("%s: said not applied, and in etcd's history: %v", o.answer, h.byValue[strconv.FormatInt(o.sets()[0], 10)])
			case o.outcome == committed && !applied:
				t.Errorf("%s: said committed, and not in etcd's history", o.answer)
			}
			switch {
			case o.outcome == answered:
				history = append(history, o.kvOp)
			case applied:
				if o.outcome == unknown {
					counts["unknown, applied"]++
					o.ret = math.MaxInt64 // it took effect at some time after its call
				}
				history = append(history, o.kvOp)
			case o.outcome == unknown:
				counts["unknown, not applied"]++
			}
		}
		checkGroup(t, g, history, ambiguous)
	}
	t.Logf("the groups' operations, by outcome: %v", counts)
}

// chaosApplied reports whether o's values are in etcd's history, each
// once, and fills in what etcd's history says of it: an applied write's
// revisions (they must be those it was answered, if it was).
func chaosApplied(o *chaosOp, h chaosHistory) (bool, error) {
	sets := o.sets()
	var found []etcdVersion
	for i, v := range sets {
		if v == 0 {
			continue
		}
		versions := h.byValue[strconv.FormatInt(v, 10)]
		switch {
		case len(versions) > 1:
			return false, fmt.Errorf("applied %d times: %v", len(versions), versions)
		case len(versions) == 0 && len(found) > 0, len(versions) == 1 && i > 0 && len(found) == 0:
			return false, fmt.Errorf("a transaction applied in part: %v", found)
		case len(versions) == 1:
			found = append(found, versions[0])
		}
	}
	if len(found) == 0 {
		return false, nil
	}
	if found[0].key != chaosKey(o.group, o.key) && o.kind != linTxn {
		return false, fmt.Errorf("written to %s", found[0].key)
	}
	// An answer that it was applied must agree; else the history fills
	// it in.
	said := o.outcome == answered && (o.kind == linSet || o.ok)
	fill := o.outcome != answered
	switch o.kind {
	case linSet, linCAS:
		if said && found[0].revision != o.newRev {
			return true, fmt.Errorf("answered revision %d; etcd's history has %d", o.newRev, found[0].revision)
		}
		if fill {
			o.newRev, o.ok = found[0].revision, true
		}
	case linTxn:
		var revs []int64
		j := 0
		for _, w := range o.writes {
			if w.del {
				revs = append(revs, -1)
				continue
			}
			if found[j].seq != found[0].seq || found[j].key != chaosKey(o.group, w.key) {
				return true, fmt.Errorf("a transaction in etcd's history as %v", found)
			}
			revs = append(revs, found[j].revision)
			j++
		}
		if said && (!slices.Equal(revs, o.revs) || o.seq != found[0].seq) {
			return true, fmt.Errorf("answered seq %d, revisions %v; etcd's history has %d, %v", o.seq, o.revs, found[0].seq, revs)
		}
		if fill {
			o.revs, o.ok, o.seq = revs, true, found[0].seq
		}
	}
	return true, nil
}

// checkGroup checks a group's history for linearizability, each delete
// whose outcome is unknown taken as applied or not, every way, until one
// passes.
func checkGroup(t *testing.T, g int, history, ambiguous []kvOp) {
	t.Helper()
	if len(ambiguous) > 8 {
		t.Errorf("group %d: %d deletes of unknown outcome; the check tries every subset, and stops at 8", g, len(ambiguous))
		return
	}
	slices.SortFunc(history, func(a, b kvOp) int { return cmp.Compare(a.call, b.call) })
	began := time.Now()
	for subset := 0; subset < 1<<len(ambiguous); subset++ {
		h := slices.Clone(history)
		for i, o := range ambiguous {
			if subset&(1<<i) != 0 {
				h = append(h, o)
			}
		}
		if linearizableKV(h) {
			t.Logf("group %d: %d operations linearizable (%d deletes of unknown outcome; checked in %v)", g, len(h), len(ambiguous), time.Since(began).Round(time.Millisecond))
			// Not vacuous: a read of a value never written fails it.
			if i := slices.IndexFunc(h, func(o kvOp) bool { return o.kind == linGet && o.read.present }); g == 0 && i >= 0 {
				h[i].read.value = -7
				if linearizableKV(h) {
					t.Errorf("group %d: the history with a read of a value never written is linearizable: the check is vacuous", g)
				}
			}
			return
		}
	}
	for _, o := range history {
		t.Log(o)
	}
	t.Errorf("group %d: a history of %d operations (and %d deletes of unknown outcome) is not linearizable", g, len(history), len(ambiguous))
}

// reportChaos logs what the run measured: writes acknowledged per
// second, and after each kill the longest time without one (from the
// kill to the first write after, and between writes while the failure
// lasted), and how long followers took to resume.
func reportChaos(t *testing.T, run *chaosRun, faults []chaosFault, followers []*chaosFollower, ran time.Duration) {
	t.Helper()
	acks := slices.Clone(run.acks)
	slices.Sort(acks)
	perSecond := make([]int, int(ran/time.Second)+1)
	for _, a := range acks {
		if s := int(a / time.Second); s < len(perSecond) {
			perSecond[s]++
		}
	}
	var b strings.Builder
	for s, n := range perSecond {
		fmt.Fprintf(&b, " %d:%d", s, n)
	}
	t.Logf("writes acknowledged per second (second:writes):%s", b.String())
	t.Logf("%d writes acknowledged in %.1fs: %.0f a second", len(acks), ran.Seconds(), float64(len(acks))/ran.Seconds())
	for _, f := range faults {
		i, _ := slices.BinarySearch(acks, f.killed)
		first, longest := time.Duration(-1), time.Duration(0)
		prev := f.killed
		for ; i < len(acks) && prev < f.healed; i++ {
			if first < 0 {
				first = acks[i] - f.killed
			}
			longest = max(longest, acks[i]-prev)
			prev = acks[i]
		}
		t.Logf("%-13s %-6s killed at %5.1fs: first write acknowledged %4d ms after, longest without one %4d ms; down %.1fs",
			f.kind, f.what, f.killed.Seconds(), first.Milliseconds(), longest.Milliseconds(), (f.healed - f.killed).Seconds())
	}
	for _, f := range followers {
		slices.Sort(f.resumed)
		var worst time.Duration
		if len(f.resumed) > 0 {
			worst = f.resumed[len(f.resumed)-1]
		}
		t.Logf("%s: %d connections, %d changes, resumed %d times, the longest %d ms from its connection's end to synced",
			f.name, f.connections, len(f.changes), len(f.resumed), worst.Milliseconds())
	}
}

// linearizableKV reports whether a history of the store is linearizable
// from the empty store (checkLinearizable, the one checker).
func linearizableKV(history []kvOp) bool {
	ops := make([]linOp[linState], len(history))
	for i, o := range history {
		ops[i] = o.lin()
	}
	ok, _ := checkLinearizable(linState{}, ops)
	return ok
}
