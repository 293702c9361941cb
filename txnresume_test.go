package main

// Every id a stream sends is a safe resume point, and none falls inside
// a transaction (SPEC 4a, 11): a client cut off anywhere in a burst of
// transactions resumes and ends with the store's state, and at every
// resume point it held whole transactions only.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
)

// storeBank reaches the bank on a store directly.
func storeBank(s *Store, name string) *bankClient {
	list := func() ([]string, error) {
		var keys []string
		for _, it := range s.List("/bank/") {
			keys = append(keys, it.key)
		}
		return keys, nil
	}
	read := func(keys []string) ([]*int64, []int64, error) {
		values, revs := make([]*int64, len(keys)), make([]int64, len(keys))
		for i, key := range keys {
			e := s.Get(key)
			revs[i] = revisionOf(e)
			if e != nil {
				v, err := strconv.ParseInt(e.value, 10, 64)
				if err != nil {
					return nil, nil, fmt.Errorf("%s = %s", key, e.value)
				}
				values[i] = &v
			}
		}
		return values, revs, nil
	}
	commit := func(body string) (bool, error) {
		var j struct {
			Check []struct {
				Key      string
				Revision int64
			}
			Ops []struct {
				Op, Key string
				Value   json.RawMessage
			}
		}
		if err := json.Unmarshal([]byte(body), &j); err != nil {
			return false, err
		}
		t := &txn{}
		for _, c := range j.Check {
			t.checks = append(t.checks, check{c.Key, c.Revision})
		}
		for _, o := range j.Ops {
			t.ops = append(t.ops, op{key: o.Key, del: o.Op == "delete", value: string(o.Value)})
		}
		err := s.Commit(t)
		if errors.Is(err, errConflict) {
			return false, nil
		}
		return err == nil, err
	}
	return &bankClient{list: list, read: read, commit: commit, name: name}
}

// seedBank opens bankOpen accounts under /bank/ with bankStart each.
func seedBank(t *testing.T, s *Store) {
	t.Helper()
	tx := &txn{}
	for i := range bankOpen {
		tx.ops = append(tx.ops, op{key: bankKey(i), value: strconv.Itoa(bankStart)})
	}
	if err := s.Commit(tx); err != nil {
		t.Fatal(err)
	}
}

// A recorder is one protocol's side of TestTxnEveryIDIsSafe: it opens a
// subscription of /bank/ on a stream as the server does, and reads what
// the stream sent as a client does.
type recorder interface {
	// open subscribes a stream from (fromScratch, or a point a client
	// resumes from) and returns it with the bytes it starts with.
	open(s *Store, from int64) (*stream, *subscription, []byte)
	// points splits a stream's bytes into the points a client may be
	// cut off at, each with what the client holds there, taking each
	// message into c, which it copies for each point.
	points(t *testing.T, out []byte, c holder) []point
	// fresh returns a client that has read nothing.
	fresh() holder
	// interject queues what the stream sends besides its subscription's
	// events, as another goroutine may at any moment: a heartbeat (SSE),
	// a reply (WebSocket).
	interject(q *coalescer)
}

// holder is what a protocol's client holds.
type holder interface {
	clone() holder
	ledger() ledger
	// resumeFrom is where it resumes from: fromScratch if it has no
	// point yet.
	resumeFrom() int64
	resumed() // a new connection: its subscription is not synced yet
	synced() bool
}

// point is a place a client may be cut off, and what it holds there.
type point struct {
	at int // bytes read
	c  holder
}

type sseRecorder struct{}

func (sseRecorder) open(s *Store, from int64) (*stream, *subscription, []byte) {
	st := &stream{}
	sse := &sseStream{}
	sse.sub = subscription{path: "/bank/", q: &st.q}
	st.proto = sse
	sse.resumeAt = s.Subscribe(&sse.sub, from, nil)
	return st, &sse.sub, fmt.Appendf(nil, "retry: 2000\nid: %d\n\n", sse.resumeAt) // as handleEvents writes it
}

func (sseRecorder) interject(q *coalescer) { q.push(event{kind: evHeartbeat}) }

func (sseRecorder) fresh() holder { return &sseClient{sseLedger: sseLedger{l: ledger{}}} }

type sseClient struct {
	sseLedger
	lastID string // EventSource's last event id
}

func (c *sseClient) clone() holder {
	d := *c
	d.l = maps.Clone(c.l)
	d.fresh = maps.Clone(c.fresh)
	return &d
}
func (c *sseClient) ledger() ledger { return c.l }
func (c *sseClient) resumed()       { c.sseLedger.synced = false }
func (c *sseClient) synced() bool   { return c.sseLedger.synced }

// resumeFrom is what EventSource sends: the last event id; with none,
// the stream asks for ?initial.
func (c *sseClient) resumeFrom() int64 {
	if c.lastID == "" {
		return fromScratch
	}
	return resumePoint(c.lastID)
}

// points are the ends of blocks: a line cut short, or a block not ended
// by its blank line, counts for nothing (TestEveryIDIsSafe cuts after
// each line, to the same effect).
func (sseRecorder) points(t *testing.T, out []byte, c holder) []point {
	cl := c.(*sseClient)
	var pts []point
	counted := &countingReader{r: bytes.NewReader(out)}
	r := bufio.NewReaderSize(counted, 16)
	readBlocks(r, func(b sseBlock) bool {
		if err := cl.take(b); err != nil {
			t.Fatal(err)
		}
		cl.lastID = b.lastID
		pts = append(pts, point{at: counted.n - r.Buffered(), c: cl.clone()})
		return true
	})
	return pts
}

// countingReader counts the bytes read through it.
type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

type wsRecorder struct{}

// open subscribes as a client that spells keys KvServer's way ("bank/").
func (wsRecorder) open(s *Store, from int64) (*stream, *subscription, []byte) {
	st := &stream{}
	c := &wsConn{out: &wsOut{}, st: st}
	st.proto = c
	sub := &subscription{path: "/bank/", q: &st.q, kvserver: true}
	s.Subscribe(sub, from, nil)
	return st, sub, nil
}

func (wsRecorder) interject(q *coalescer) {
	q.push(event{kind: evReply, reply: message(json.RawMessage(`"r"`), "ok", []byte(`{"key":"/elsewhere"}`))})
}

func (wsRecorder) fresh() holder { return &wsClientState{wsLedger: wsLedger{l: ledger{}}, since: -1} }

type wsClientState struct {
	wsLedger
	since int64 // the last seq a message carried; -1: none
}

func (c *wsClientState) clone() holder {
	d := *c
	d.l = maps.Clone(c.l)
	d.fresh = maps.Clone(c.fresh)
	return &d
}
func (c *wsClientState) ledger() ledger { return c.l }
func (c *wsClientState) resumed()       { c.wsLedger.synced = false }
func (c *wsClientState) synced() bool   { return c.wsLedger.synced }

// resumeFrom is what the served client sends: since, the last seq it
// had (subscribe's since, read as subscribeFrom reads it), or initial.
func (c *wsClientState) resumeFrom() int64 {
	if c.since < 0 {
		return fromScratch
	}
	return resumePoint(strconv.FormatInt(c.since, 10))
}

// points are the ends of frames: each holds one message.
func (wsRecorder) points(t *testing.T, out []byte, c holder) []point {
	cl := c.(*wsClientState)
	var pts []point
	for at := 0; at < len(out); {
		if out[at] != 0x81 {
			t.Fatalf("frame at %d: first byte %#x; want a final text frame", at, out[at])
		}
		n, h := int(out[at+1]), 2
		switch n {
		case 126:
			n, h = int(binary.BigEndian.Uint16(out[at+2:])), 4
		case 127:
			n, h = int(binary.BigEndian.Uint64(out[at+2:])), 10
		}
		raw := string(out[at+h : at+h+n])
		at += h + n
		var m wsMsg
		if err := json.Unmarshal([]byte(raw), &m); err != nil {
			t.Fatalf("message %s: %v", raw, err)
		}
		m.raw = raw
		if m.ID != nil {
			pts = append(pts, point{at: at, c: cl.clone()})
			continue // a reply
		}
		var ev wsEvent
		json.Unmarshal(m.Payload, &ev)
		if m.Type != "reset" {
			cl.since = ev.Seq
		}
		if _, err := cl.take(m, "/bank/"); err != nil {
			t.Fatal(err)
		}
		pts = append(pts, point{at: at, c: cl.clone()})
	}
	return pts
}

// TestTxnEveryIDIsSafe: one subscription of /bank/ (with its initial
// state) is driven through a random run of moves (bankClient.move:
// transactions that keep the bank's total, single writes inside and
// outside the path), heartbeats,
// replies (WebSocket), and flushes at random moments, some of these in
// the middle of a transaction's publishing (between the pushes of its
// events to the queue), with coalescing wherever events wait. Then, for every point a client may
// be cut off at (the end of each SSE block, each WebSocket message):
// the client holds the bank's total at every resume point it passed
// (checked as it reads: SSE ids that move past the last, WebSocket
// events without "more" and synced), and resuming from there (SSE
// Last-Event-ID, WebSocket since) ends, at synced, with exactly the
// store's state.
func TestTxnEveryIDIsSafe(t *testing.T) {
	for name, rec := range map[string]recorder{"sse": sseRecorder{}, "ws": wsRecorder{}} {
		t.Run(name, func(t *testing.T) { everyIDIsSafe(t, rec) })
	}
}

func everyIDIsSafe(t *testing.T, rec recorder) {
	s := NewStore(0, nil)
	s.keepHistory(100_000)
	seedBank(t, s)
	flush := func(st *stream, out []byte) []byte { // as the writers do, until nothing is pending
		for {
			out, _ = st.appendPending(out, s.published.Load(), &metrics{})
			if st.q.Len() == 0 {
				return out
			}
		}
	}
	st, _, out := rec.open(s, fromScratch)
	out = flush(st, out) // the initial state
	rnd := rand.New(rand.NewPCG(3, 4))
	bc := storeBank(s, "w")
	midPublish, interjecting := 0, false
	st.q.notify = func() { // called after each push, in the publisher's goroutine
		switch r := rnd.IntN(8); {
		case r < 2:
			out, _ = st.appendPending(out, s.published.Load(), &metrics{})
			midPublish++
		case r == 2 && !interjecting:
			interjecting = true
			rec.interject(&st.q)
			interjecting = false
		}
	}
	for range 600 {
		switch rnd.IntN(8) {
		case 0:
			rec.interject(&st.q)
		case 1:
			out = flush(st, out)
		default:
			if _, _, err := bc.move(rnd); err != nil {
				t.Fatal(err)
			}
		}
	}
	st.q.notify = nil
	out = flush(st, out)
	want := ledger{}
	for _, it := range s.List("/bank/") {
		want.set(it.key, json.RawMessage(it.value))
	}
	if err := want.check("the store"); err != nil {
		t.Fatal(err)
	}

	pts := rec.points(t, out, rec.fresh())
	if len(pts) == 0 || !pts[len(pts)-1].c.synced() || !sameLedger(pts[len(pts)-1].c.ledger(), want) {
		t.Fatalf("the whole stream: %d points, ends holding %v; want the store %v", len(pts), pts[len(pts)-1].c.ledger(), want)
	}
	pts = append([]point{{0, rec.fresh()}}, pts...) // cut before anything
	resets := 0
	for _, p := range pts {
		c := p.c.clone()
		from := c.resumeFrom()
		if from == fromUnknown {
			resets++
		}
		rs, sub, resumed := rec.open(s, from)
		resumed = flush(rs, resumed)
		s.Unsubscribe(sub)
		c.resumed()
		rec.points(t, resumed, c)
		if !c.synced() || !sameLedger(c.ledger(), want) {
			t.Fatalf("cut at byte %d (%q), resumed from %d: holds %v (synced %v); the store %v",
				p.at, out[max(0, p.at-80):p.at], from, c.ledger(), c.synced(), want)
		}
	}
	t.Logf("%d bytes, %d points, %d flushes in the middle of publishing, %d resumes from an unknown point", len(out), len(pts), midPublish, resets)
}

// TestTxnResumeDuringBurst: an SSE stream and a WebSocket subscription
// of /bank/ (each with its initial state) are recorded while four
// writers (two on the store, two over HTTP) run a burst of transactions
// that keep the bank's total. Then,
// for every point a client of each could have been cut off at, a new
// connection resumes from what it held there (SSE Last-Event-ID,
// WebSocket since): the state it then holds at synced is the store's at
// the end, and the total holds at every resume point on the way. In
// memory and with -data.
func TestTxnResumeDuringBurst(t *testing.T) {
	t.Run("memory", func(t *testing.T) { resumeDuringBurst(t) })
	t.Run("data", func(t *testing.T) { resumeDuringBurst(t, "-data", t.TempDir()) })
}

func resumeDuringBurst(t *testing.T, args ...string) {
	srv, url := newTestServer(t, append([]string{"-heartbeat", "2ms"}, args...)...)
	seedBank(t, srv.store)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	final := make(chan int64, 2)

	// The recordings: the bytes of the stream, the messages of the
	// WebSocket, up to the last change.
	var sseBytes bytes.Buffer
	var wsMsgs []string
	var recording sync.WaitGroup
	recording.Add(2)
	resp, err := openSSE(ctx, url+"/bank/?initial")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		defer recording.Done()
		defer resp.Body.Close()
		upTo, last := int64(-1), int64(0)
		readBlocks(bufio.NewReader(io.TeeReader(resp.Body, &sseBytes)), func(b sseBlock) bool {
			last = max(last, seqOf(b.lastID))
			if upTo < 0 {
				select {
				case upTo = <-final:
				default:
				}
			}
			return upTo < 0 || last < upTo
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
		defer recording.Done()
		upTo, last := int64(-1), int64(0)
		for upTo < 0 || last < upTo {
			m, err := p.recv()
			if err != nil {
				t.Error(err)
				return
			}
			if m.ID == nil { // a reply is the wake-up below
				wsMsgs = append(wsMsgs, m.raw)
				var ev wsEvent
				json.Unmarshal(m.Payload, &ev)
				if !ev.More {
					last = max(last, ev.Seq)
				}
			}
			if upTo < 0 {
				select {
				case upTo = <-final:
				default:
				}
			}
		}
	}()

	var writers sync.WaitGroup
	var failed atomic.Bool
	for w := range 4 {
		writers.Add(1)
		go func() {
			defer writers.Done()
			rnd := rand.New(rand.NewPCG(uint64(w), 9))
			bc := storeBank(srv.store, strconv.Itoa(w))
			if w%2 == 1 {
				bc = httpBank(url, strconv.Itoa(w))
			}
			for range 60 {
				if _, _, err := bc.move(rnd); err != nil && !failed.Swap(true) {
					t.Error(err)
				}
			}
		}()
	}
	writers.Wait()
	raw, seq := bankEnd(t, url)
	final <- seq
	final <- seq
	if err := p.send(`{"type":"get","id":"wake","payload":{"key":"/none"}}`); err != nil {
		t.Fatal(err)
	}
	recording.Wait()
	if t.Failed() {
		return
	}
	want, err := ledgerOf([]byte(raw))
	if err != nil {
		t.Fatal(err)
	}

	// SSE: every block end that moved the id or brought data.
	sseRec := sseRecorder{}
	pts := sseRec.points(t, sseBytes.Bytes(), sseRec.fresh())
	pts = append([]point{{0, sseRec.fresh()}}, pts...)
	resumes := 0
	for i, pt := range pts {
		c := pt.c.(*sseClient)
		if i > 0 && i < len(pts)-1 && c.lastID == pts[i-1].c.(*sseClient).lastID && c.events == pts[i-1].c.(*sseClient).events {
			continue // a heartbeat that moved nothing
		}
		resumes++
		c = c.clone().(*sseClient)
		headers := []string{}
		if c.lastID != "" {
			headers = []string{"Last-Event-ID", c.lastID}
		}
		resp, err := openSSE(ctx, url+"/bank/?initial", headers...)
		if err != nil {
			t.Fatal(err)
		}
		c.resumed()
		readBlocks(bufio.NewReader(resp.Body), func(b sseBlock) bool {
			if err := c.take(b); err != nil {
				t.Fatalf("resumed from %q: %v", pt.c.(*sseClient).lastID, err)
			}
			return !c.synced()
		})
		resp.Body.Close()
		if !c.synced() || !sameLedger(c.l, want) {
			t.Fatalf("SSE cut at byte %d, resumed from %q: holds %v (synced %v); the store %v", pt.at, pt.c.(*sseClient).lastID, c.l, c.synced(), want)
		}
	}

	// WebSocket: every message.
	wsRec := wsRecorder{}
	var frames []byte
	for _, m := range wsMsgs {
		frames = appendFrame(frames, opText, []byte(m))
	}
	wpts := wsRec.points(t, frames, wsRec.fresh())
	wpts = append([]point{{0, wsRec.fresh()}}, wpts...)
	q, err := dialPeer(url)
	if err != nil {
		t.Fatal(err)
	}
	defer q.ws.Close()
	for _, pt := range wpts {
		c := pt.c.clone().(*wsClientState)
		sub := `{"key":"bank/","initial":true}`
		if c.since >= 0 {
			sub = fmt.Sprintf(`{"key":"bank/","since":%d}`, c.since)
		}
		if m, err := q.request("subscribe", sub); err != nil || m.Type != "ok" {
			t.Fatalf("subscribe %s: %v %s", sub, err, m.raw)
		}
		c.resumed()
		for done := false; !done; {
			m, err := q.recv()
			if err == nil {
				done, err = c.take(m, "bank/")
			}
			if err != nil {
				t.Fatalf("resumed with %s: %v", sub, err)
			}
		}
		if !sameLedger(c.l, want) {
			t.Fatalf("WebSocket cut after message %d, resumed with %s: holds %v; the store %v", pt.at, sub, c.l, want)
		}
		if m, err := q.request("unsubscribe", `{"key":"bank/"}`); err != nil || m.Type != "ok" {
			t.Fatalf("unsubscribe: %v %s", err, m.raw)
		}
	}
	t.Logf("SSE: %d bytes, %d resumes; WebSocket: %d messages, %d resumes", sseBytes.Len(), resumes, len(wsMsgs), len(wpts))
}
