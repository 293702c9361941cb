package main

import (
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// event is one thing a subscriber is sent: a change of a key, a key's
// state, a mark of where a subscription stands, a state still to read,
// or, for the WebSocket API, a reply to send as it is (replies are queued
// with the events, so both leave in order).
type event struct {
	sub   *subscription // whose event it is; nil for a reply
	key   string
	e     *entry   // nil: the key is missing
	seq   int64    // of a change; of synced, the point it marks
	reply *wsReply // a WebSocket reply
	state cursor   // a state or a listing to read, in its place in the queue
	kind  eventKind
	why   reason // of a change to missing
	older bool   // an older event of its key is pending before a reply
	// joined: another event of the same transaction follows it in the
	// queue, so no resume point may fall after it (SPEC 11).
	joined bool
}

type eventKind uint8

const (
	evGone      eventKind = iota // taken out of the queue: a newer one of its key came
	evChange                     // a change of key: e, why, seq
	evState                      // the state of key when the subscription started
	evSynced                     // the state is whole: resume from seq
	evReset                      // forget what you held of the subscription's path
	evHeartbeat                  // a comment line, and how far the stream has come
	evReply                      // reply
	evCursor                     // state: the subscription's state, or a WebSocket listing (sub nil), read when its turn comes
)

// A cursor is what a queue holds of something long that is read from the
// store only as the connection drains (SPEC 10): a subscription's state,
// or a WebSocket listing. When its turn comes it is the queue's front,
// and the writer reads it a chunk at a time.
type cursor interface {
	// read appends the next events, and reports whether it is done.
	read(out []event) ([]event, bool)
	// stopWalk ends it early: the stream closed while it was the front.
	stopWalk()
	// drop lets go of what it holds (its snapshot), without a lock but
	// the snapshots' own: the queue dropped it before it began (a newer
	// state replaced it, or the stream closed).
	drop()
}

// coalesces reports whether a newer event of the same subscription and
// key replaces ev. A cursor coalesces with the subscription's cursor not
// yet started, under the key "", which no key is.
func (ev *event) coalesces() bool {
	return ev.kind == evChange || ev.kind == evState || ev.kind == evCursor && ev.sub != nil
}

// barrier reports whether ev is a reply (or a listing, which is one):
// nothing queued after it may move before it (SPEC 5, "Order").
//
// A reply with nothing to send, which only marks a place (a subscribe's
// without id), is none: an event moved past it is of a later change than
// the place it marks.
func (ev *event) barrier() bool {
	return ev.kind == evReply && !ev.reply.empty() || ev.kind == evCursor && ev.sub == nil
}

// weight is what ev counts against a connection's bound: the bytes it
// will take on the wire, about, or a cursor's own size.
func (ev *event) weight() int64 {
	switch ev.kind {
	case evGone:
		return 0
	case evReply:
		return ev.reply.size
	case evCursor:
		return cursorWeight
	}
	n := int64(64 + len(ev.key))
	if ev.e != nil {
		n += int64(len(ev.e.value))
	}
	return n
}

// cursorWeight is what a state still to read counts: its cursor, and
// the walk it may start (a parked iterator's stack).
const cursorWeight = 512

// eventKey is what a queue coalesces on: one pending event per
// subscription and key.
type eventKey struct {
	sub *subscription
	key string
}

// coalescer is the queue between the publishers and one subscriber. It
// holds at most one pending event per subscription and key: a newer
// change of a key that is already pending replaces it, so a subscriber
// that cannot keep up skips intermediate revisions but always gets the
// latest, and its memory is bounded by the number of keys it watches.
//
// The newer event goes to the end, where the older one leaves a gap that
// drain skips: the queue stays in the order of the changes it holds, so
// every change event's number is a safe resume point when it is sent. (In
// place, a newer change of /a could be sent before an older one of /b,
// and a client cut off between them would resume past /b's.) Gaps are
// squeezed out once they are half the queue.
//
// A reply is a barrier (SPEC 5, "Order"): an event pending before a reply
// stays there, and a newer one of its key goes after the reply instead of
// replacing it, so a write's event never moves behind the write's ok. The
// events kept that way are at most one per key and reply, so they stay
// bounded by the replies' bound.
//
// A subscription's state is a cursor in the queue. drain stops at it;
// it becomes the front, and the writer reads it a chunk at a time, each
// after the last is written, until it is whole; what was queued behind it
// waits. So a state costs the queue its cursor, and no more.
//
// Pushing never blocks, and once the queue has grown to its working size
// it does not allocate.
type coalescer struct {
	notify func() // called after each push, if not nil

	// size is the weight of the events pending, in the front and in the
	// batch being written (until the writer calls sent): what a
	// connection's bound counts. Changed under mu.
	size atomic.Int64

	mu      sync.Mutex
	pending []event          // from head on; before it, taken
	head    int              // the first pending event's position
	gaps    int              // events in pending[head:] that are evGone
	index   map[eventKey]int // position in pending of each key's newest event
	barrier int              // positions before it lie before a reply
	cursors int              // evCursor events in pending
	front   cursor           // the state or listing being read; nil if none
	frontOf *subscription    // whose state front is; nil for a listing
	stale   bool             // front was replaced by a newer cursor of its subscription
	closed  bool             // the stream closed: nothing more goes out
	spare   []event          // the slice of the last batch, for reuse
	dropped int64            // events replaced by newer ones, since recycle
	inTxn   bool             // the last change drained is joined to the next: a transaction is half sent
}

// push queues ev.
func (q *coalescer) push(ev event) {
	q.mu.Lock()
	w := ev.weight()
	if ev.coalesces() {
		k := eventKey{ev.sub, ev.key}
		if ev.kind == evCursor && ev.sub != nil && q.front != nil && q.frontOf == ev.sub {
			q.stale = true // the state in progress stops for the new one
		}
		i, ok := q.index[k]
		switch {
		case ok && i == len(q.pending)-1:
			// Last already: replacing it in place keeps the order.
			q.size.Add(w - q.pending[i].weight()) // one atomic add on this, the common path
			ev.older = q.pending[i].older
			q.pending[i] = ev
			q.dropped++
			q.mu.Unlock()
			q.wake()
			return
		case ok && i < q.barrier:
			// A reply was queued after it: it stays, the newer one
			// goes after the reply.
			ev.older = true
		case ok:
			ev.older = q.pending[i].older
			if q.inTransaction(i) {
				// The rest of its transaction stays where it is: it and
				// everything after it, up to the newer event, become one,
				// so that no resume point falls where part of it is sent
				// and part not.
				for j := i; j < len(q.pending); j++ {
					q.pending[j].joined = true
				}
			}
			q.remove(i)
			q.dropped++
		case q.index == nil:
			q.index = make(map[eventKey]int)
		}
		q.index[k] = len(q.pending)
	}
	if ev.kind == evCursor {
		q.cursors++
	}
	q.size.Add(w)
	q.pending = append(q.pending, ev)
	if ev.barrier() {
		q.barrier = len(q.pending)
	}
	if dead := q.gaps + q.head; dead > 16 && dead > len(q.pending)/2 {
		q.squeeze()
	}
	q.mu.Unlock()
	q.wake()
}

// inTransaction reports whether the pending event at i shares a
// transaction with another pending event: it is joined to the next, or
// the one before it is joined to it. q.mu must be held.
func (q *coalescer) inTransaction(i int) bool {
	if q.pending[i].joined {
		return true
	}
	for j := i - 1; j >= q.head; j-- {
		// A heartbeat or a reply may be queued between a transaction's
		// events: only a change tells.
		if q.pending[j].kind == evChange {
			return q.pending[j].joined
		}
	}
	return q.inTxn // the events before it are drained already
}

// remove turns the pending event at i into a gap. q.mu must be held.
func (q *coalescer) remove(i int) {
	ev := &q.pending[i]
	q.size.Add(-ev.weight())
	if ev.kind == evCursor {
		q.cursors--
		ev.state.drop()
	}
	*ev = event{}
	q.gaps++
}

// drop removes every pending event of sub and key: a state read now
// replaces them.
func (q *coalescer) drop(sub *subscription, key string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	k := eventKey{sub, key}
	i, ok := q.index[k]
	if !ok {
		return
	}
	delete(q.index, k)
	older := q.pending[i].older
	q.remove(i)
	for j := i - 1; older && j >= q.head; j-- { // rare: only across replies
		if ev := &q.pending[j]; ev.sub == sub && ev.key == key && ev.coalesces() {
			older = ev.older
			q.remove(j)
		}
	}
}

// stops reports whether c, the front, must stop: a newer cursor of its
// subscription replaced it, or the stream closed.
func (q *coalescer) stops(c cursor) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.front != c || q.stale || q.closed
}

func (q *coalescer) wake() {
	if q.notify != nil {
		q.notify()
	}
}

// squeeze removes the gaps, and what was taken, from pending, in place.
// q.mu must be held.
func (q *coalescer) squeeze() {
	n := 0
	q.barrier = 0
	for _, ev := range q.pending[q.head:] {
		if ev.kind == evGone {
			continue
		}
		if ev.coalesces() {
			q.index[eventKey{ev.sub, ev.key}] = n // the newest comes last
		}
		q.pending[n] = ev
		n++
		if ev.barrier() {
			q.barrier = n
		}
	}
	clear(q.pending[n:])
	q.pending = q.pending[:n]
	q.head, q.gaps = 0, 0
}

// drain takes the pending events, in the order they were queued, up to
// the first state still to read, which becomes the front; gaps are
// evGone, to skip. While there is a front, it takes nothing and returns
// the front, for the writer to read. The caller hands the batch back
// with recycle when it is done with it.
//
// What waits behind a state stays where it is: the events before it are
// copied out, and pending starts after it (head), so that a queue of
// many states costs each only its own batch.
func (q *coalescer) drain() (batch []event, front cursor) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return nil, nil
	}
	if q.front != nil {
		return nil, q.front
	}
	defer func() {
		for i := len(batch) - 1; i >= 0; i-- {
			if batch[i].kind == evChange {
				q.inTxn = batch[i].joined
				break
			}
		}
	}()
	if q.cursors == 0 {
		batch = q.pending[q.head:]
		q.pending = q.spare[:0]
		q.spare = nil
		q.head, q.gaps, q.barrier = 0, 0, 0
		clear(q.index)
		return batch, nil
	}
	k := q.head
	for q.pending[k].kind != evCursor {
		k++
	}
	batch = append(q.spare[:0], q.pending[q.head:k]...)
	q.spare = nil
	for i := range batch {
		switch ev := &batch[i]; {
		case ev.kind == evGone:
			q.gaps--
		case ev.coalesces() && q.index[eventKey{ev.sub, ev.key}] == q.head+i:
			delete(q.index, eventKey{ev.sub, ev.key})
		}
	}
	q.front, q.frontOf, q.stale = q.pending[k].state, q.pending[k].sub, false
	q.cursors--
	if ck := (eventKey{q.frontOf, ""}); q.frontOf != nil && q.index[ck] == k {
		delete(q.index, ck)
	}
	clear(q.pending[q.head : k+1])
	q.head = k + 1
	return batch, q.front
}

// endFront ends the state being read.
func (q *coalescer) endFront() {
	q.mu.Lock()
	q.front, q.frontOf = nil, nil
	q.size.Add(-cursorWeight)
	q.mu.Unlock()
}

// close stops the queue: nothing more is drained, and a walk in progress
// stops.
func (q *coalescer) close() {
	q.mu.Lock()
	q.closed = true
	front := q.front
	for i := q.head; i < len(q.pending); i++ {
		if ev := &q.pending[i]; ev.kind == evCursor {
			ev.state.drop() // never to be read: its snapshot goes now
		}
	}
	q.mu.Unlock()
	if front != nil {
		front.stopWalk()
	}
}

// recycle returns a drained batch's memory for the next one, and how many
// events were replaced by newer ones since it was last called (taken
// here, under the lock recycle holds anyway, for the metrics).
func (q *coalescer) recycle(batch []event) (dropped int64) {
	clear(batch) // drop the references to values
	q.mu.Lock()
	q.spare = batch[:0]
	dropped, q.dropped = q.dropped, 0
	q.mu.Unlock()
	return dropped
}

// Len returns the number of pending events, a state in progress
// included.
func (q *coalescer) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := len(q.pending) - q.head - q.gaps
	if q.front != nil {
		n++
	}
	return n
}

// handleEvents answers GET of a path with Accept: text/event-stream: the
// Server-Sent Events stream of the changes of path. With ?initial, the
// stream first holds the current state, then synced; with a Last-Event-ID
// header, which wins, what changed after it, then synced (SPEC 4a).
//
// The connection is hijacked: once the headers are out, the handler
// returns and the stream belongs to the server's eventWriters. net/http
// would otherwise keep its buffers, a background reader and its deep stack
// alive for every idle stream.
func (s *server) handleEvents(w http.ResponseWriter, r *http.Request, path string) {
	if err := checkPath(path, s.cfg.maxKeyBytes); err != nil {
		serveError(w, http.StatusBadRequest, err.Error())
		return
	}
	from := fromNow
	if _, initial := r.URL.Query()["initial"]; initial {
		from = fromScratch
	}
	if id := r.Header.Get("Last-Event-ID"); id != "" {
		from = resumePoint(id)
	}
	if from != fromNow {
		// A state shows every change committed before the request.
		if err := s.store.journal.current(r.Context()); err != nil {
			s.serveFailure(w, apiNative, err)
			return
		}
	}
	if !s.streams.reserve() {
		serveError(w, http.StatusServiceUnavailable, "too many subscribers (-max-subscribers): try again later")
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	// The stream ends when the connection closes: there is no length.
	h.Set("Connection", "close")
	conn, buf, err := http.NewResponseController(w).Hijack()
	if err != nil {
		s.streams.done()
		// Only HTTP/1.x can be hijacked, and it is all this server speaks.
		serveError(w, http.StatusHTTPVersionNotSupported, "event streams need HTTP/1.1")
		return
	}
	st := s.writers.newStream(conn)
	st.who = s.identify(r)
	sse := &sseStream{s: s}
	sse.sub = subscription{path: path, q: &st.q}
	st.proto = sse
	s.metrics.sse.Add(1) // and sse.close takes it off
	sse.resumeAt = s.store.Subscribe(&sse.sub, from, nil)

	// The head, the retry hint and the stream's starting point go out at
	// once, so the client knows the stream is open before any change
	// happens. Until then the stream is busy, so no writer takes it.
	//
	// The first block carries an id because its end, like every blank
	// line, sets EventSource's last event id from the stream's id buffer,
	// which a new connection starts empty: without it a reconnected client
	// would forget where it was.
	buf.Writer.WriteString("HTTP/1.1 200 OK\r\n")
	h.Write(buf.Writer)
	fmt.Fprintf(buf.Writer, "\r\nretry: 2000\nid: %d\n\n", sse.resumeAt)
	conn.SetWriteDeadline(time.Now().Add(s.cfg.writeTimeout))
	err = buf.Writer.Flush()
	conn.SetWriteDeadline(time.Time{})
	if err != nil {
		st.Close()
		return
	}
	s.writers.start(st)
}

// resumePoint reads the change number a client resumes from: the last
// ":"-separated field of an event id (any id this server sends ends with
// one), or fromUnknown.
func resumePoint(id string) int64 {
	seq, err := strconv.ParseInt(id[strings.LastIndexByte(id, ':')+1:], 10, 64)
	if err != nil || seq <= 0 {
		return fromUnknown
	}
	return seq
}

// sseStream is the protocol of one subscriber's event stream.
type sseStream struct {
	s   *server
	sub subscription // of the stream's queue, to its path
	// resumeAt is the change number of the last id sent; only the writer
	// that has the stream touches it.
	resumeAt int64
	inTxn    bool // the last event sent is joined to the next: no heartbeat id
}

func (p *sseStream) sent()      {}
func (p *sseStream) more() bool { return false }

// heartbeat queues a comment line, and the stream's progress (see
// appendHeartbeat).
func (p *sseStream) heartbeat() { p.sub.q.push(event{kind: evHeartbeat}) }

// close unsubscribes, and counts the stream out.
func (p *sseStream) close() {
	p.s.store.Unsubscribe(&p.sub)
	p.s.streams.done()
	p.s.metrics.sse.Add(-1)
}

// appendBatch appends a drained batch as SSE. Every change numbered up
// to upTo was queued before the batch was drained.
func (st *sseStream) appendBatch(b []byte, batch []event, upTo int64) []byte {
	beat := false
	for i := range batch {
		if batch[i].kind == evHeartbeat {
			beat = true // its id goes last: a change before upTo may follow it
			continue
		}
		b = st.appendEvent(b, &batch[i])
	}
	if beat {
		b = st.appendHeartbeat(b, upTo)
	}
	return b
}

// appendEvent appends ev as an SSE message (SPEC sections 4 and 4a):
//
//   - a change or a state: "id: <key>:<revision>:<tag>" and "data:
//     <value>", or revision -1 and null for a missing key; the tag is the
//     change's number once the subscription is synced, and its floor
//     before. A compact JSON value has no newline, so it is always a
//     single data line; nor has a key, which holds no control character;
//   - synced: "event: synced", "id: <seq>", "data: {}";
//   - reset: "id: <floor>", "event: reset", "data: {}".
func (st *sseStream) appendEvent(b []byte, ev *event) []byte {
	sub := &st.sub
	switch ev.kind {
	case evGone:
		return b
	case evReset:
		// Its id is the floor, so that a client cut off in the state that
		// follows, or one whose id buffer starts empty, resets again.
		b = append(b, "id: "...)
		b = strconv.AppendInt(b, sub.floor, 10)
		return append(b, "\nevent: reset\ndata: {}\n\n"...)
	case evSynced:
		sub.syncing = false
		st.resumeAt = ev.seq
		b = append(b, "event: synced\nid: "...)
		b = strconv.AppendInt(b, ev.seq, 10)
		return append(b, "\ndata: {}\n\n"...)
	}
	tag := sub.floor
	st.inTxn = ev.joined
	switch {
	case sub.syncing:
	case ev.joined:
		tag = st.resumeAt // no resume point inside a transaction
	default:
		tag = ev.seq
		st.resumeAt = tag
	}
	b = append(b, "id: "...)
	b = appendIDKey(b, ev.key)
	if ev.e == nil {
		b = append(b, ":-1:"...)
		b = strconv.AppendInt(b, tag, 10)
		return append(b, "\ndata: null\n\n"...)
	}
	b = append(b, ':')
	b = strconv.AppendInt(b, ev.e.revision, 10)
	b = append(b, ':')
	b = strconv.AppendInt(b, tag, 10)
	b = append(b, "\ndata: "...)
	b = append(b, ev.e.value...)
	return append(b, "\n\n"...)
}

// appendHeartbeat appends a comment line, which keeps proxies from dropping an
// idle stream and finds clients that have left, and, once the
// subscription is synced, "id: <upTo>" if that is further on: an event
// with an id and no data moves EventSource's last event id without
// reaching onmessage, so that a quiet stream's resume point keeps up with
// the history and a reconnect after a long quiet resumes rather than
// resets. It goes after the batch, all of which is before upTo.
func (st *sseStream) appendHeartbeat(b []byte, upTo int64) []byte {
	b = append(b, ":\n"...)
	if !st.sub.syncing && !st.inTxn && upTo > st.resumeAt {
		st.resumeAt = upTo
		b = append(b, "id: "...)
		b = strconv.AppendInt(b, upTo, 10)
		b = append(b, '\n')
	}
	return append(b, '\n')
}
