package main

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// event is one thing a subscriber is sent: a change of a key, a key's
// state, a mark of where a subscription stands, or, for the WebSocket
// API, a reply to send as it is (replies are queued with the events, so
// both leave in order).
type event struct {
	kind eventKind
	sub  *subscription // whose event it is; nil for a reply
	key  string
	e    *entry // nil: the key is missing
	why  reason // of a change to missing
	seq  int64  // of a change; of synced, the point it marks
	raw  []byte // a reply
}

type eventKind uint8

const (
	evGone   eventKind = iota // taken out of the queue: a newer one of its key came
	evChange                  // a change of key: e, why, seq
	evState                   // the state of key when the subscription started
	evSynced                  // the state is whole: resume from seq
	evReset                   // forget what you held of the subscription's path
	evMark                    // where the subscription stands: a stream's resume point, a heartbeat
	evReply                   // raw
)

// coalesces reports whether a newer event of the same subscription and
// key replaces ev.
func (ev *event) coalesces() bool { return ev.kind == evChange || ev.kind == evState }

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
// Pushing never blocks, and once the queue has grown to its working size
// it does not allocate.
type coalescer struct {
	notify func() // called after each push, if not nil

	mu      sync.Mutex
	pending []event
	gaps    int              // events in pending that are evGone
	index   map[eventKey]int // position in pending of each coalescing event
	spare   []event          // the slice of the last batch, for reuse
}

// push queues ev.
func (q *coalescer) push(ev event) {
	q.mu.Lock()
	if ev.coalesces() {
		k := eventKey{ev.sub, ev.key}
		if i, ok := q.index[k]; ok {
			q.pending[i] = event{}
			q.gaps++
		} else if q.index == nil {
			q.index = make(map[eventKey]int)
		}
		q.index[k] = len(q.pending)
	}
	q.pending = append(q.pending, ev)
	if q.gaps > 16 && q.gaps > len(q.pending)/2 {
		q.squeeze()
	}
	q.mu.Unlock()
	if q.notify != nil {
		q.notify()
	}
}

// squeeze removes the gaps from pending, in place. q.mu must be held.
func (q *coalescer) squeeze() {
	n := 0
	for _, ev := range q.pending {
		if ev.kind == evGone {
			continue
		}
		if ev.coalesces() {
			q.index[eventKey{ev.sub, ev.key}] = n
		}
		q.pending[n] = ev
		n++
	}
	clear(q.pending[n:])
	q.pending = q.pending[:n]
	q.gaps = 0
}

// drain takes every pending event, in the order they were queued; gaps
// are evGone, to skip. The caller hands the batch back with recycle when
// it is done with it.
func (q *coalescer) drain() []event {
	q.mu.Lock()
	defer q.mu.Unlock()
	batch := q.pending
	q.pending = q.spare[:0]
	q.spare = nil
	q.gaps = 0
	clear(q.index)
	return batch
}

// recycle returns a drained batch's memory for the next one.
func (q *coalescer) recycle(batch []event) {
	clear(batch) // drop the references to values
	q.mu.Lock()
	q.spare = batch[:0]
	q.mu.Unlock()
}

// Len returns the number of pending events.
func (q *coalescer) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.pending) - q.gaps
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
	st := s.writers.newStream(conn, path)
	from := fromNow
	if _, initial := r.URL.Query()["initial"]; initial {
		from = fromScratch
	}
	if id := r.Header.Get("Last-Event-ID"); id != "" {
		from = resumePoint(id)
	}
	s.store.Subscribe(&st.sub, from)

	// The head and the retry hint go out at once, so the client knows the
	// stream is open before any change happens. Until then the stream is
	// busy, so no writer takes it.
	buf.Writer.WriteString("HTTP/1.1 200 OK\r\n")
	h.Write(buf.Writer)
	buf.Writer.WriteString("\r\nretry: 2000\n\n")
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

// eventWriters writes the event streams: a few goroutines, one per CPU,
// take the streams that have events pending in the order they became
// ready, and write each one's whole batch with one non-blocking write. A
// stream whose client does not take it all gets a goroutine of its own
// until the rest is out, so one slow client never holds up the others.
//
// A goroutine per stream, the usual design, costs a stack per idle
// subscriber, and under load puts thousands of runnable goroutines ahead
// of everything else, writes included: an update waited for the whole
// fan-out of the previous one. Here the run queue stays short, and a
// stream still waiting its turn when a newer value comes sends only the
// newer one.
type eventWriters struct {
	s       *server
	started sync.Once
	stop    chan struct{}
	wg      sync.WaitGroup // the writers, the heartbeat and slow writes

	slow atomic.Int64 // writes left to the slow path: clients that fell behind

	mu    sync.Mutex
	ready []*sseStream // streams with events pending, from head on
	head  int
	wake  chan struct{} // one token per idle writer to wake
}

// newEventWriters returns the writers of s's event streams, one per CPU:
// 82% of their time is the write(2) itself, so fewer would leave CPUs idle
// when the fan-out is the work. (One fewer than the CPUs answered writes
// sooner when the server is overloaded, but had 1.4 times the fan-out
// latency on 2 CPUs when it is not.)
func newEventWriters(s *server) *eventWriters {
	return &eventWriters{s: s, stop: make(chan struct{}), wake: make(chan struct{}, runtime.GOMAXPROCS(0))}
}

// sseStream is one subscriber's event stream.
type sseStream struct {
	w    *eventWriters
	conn net.Conn
	raw  syscall.RawConn // nil: every write takes the slow path
	q    coalescer
	sub  subscription // of q, to the stream's path
	// busy is set while the stream is queued or being written, so that
	// only one writer has it at a time.
	busy atomic.Bool
	// resumeAt is the change number of the last id sent; only the writer
	// that has the stream touches it.
	resumeAt int64
	closed   sync.Once
}

// newStream returns a stream for conn, busy until start.
func (w *eventWriters) newStream(conn net.Conn, path string) *sseStream {
	st := &sseStream{w: w, conn: conn}
	st.sub = subscription{path: path, q: &st.q}
	if sc, ok := conn.(syscall.Conn); ok {
		st.raw, _ = sc.SyscallConn()
	}
	st.busy.Store(true)
	st.q.notify = st.ready
	return st
}

// start hands st to the writers, and has it closed on shutdown.
func (w *eventWriters) start(st *sseStream) {
	w.started.Do(func() {
		for range cap(w.wake) {
			w.wg.Add(1)
			go w.write()
		}
		w.wg.Add(1)
		go w.beat()
	})
	if !w.s.streams.track(st) {
		st.Close() // the server is closing
		return
	}
	st.idle()
}

// ready queues st for a writer, unless it is already queued or being
// written. The coalescer calls it after each push.
func (st *sseStream) ready() {
	if !st.busy.CompareAndSwap(false, true) {
		return
	}
	w := st.w
	w.mu.Lock()
	if len(w.ready) == cap(w.ready) && w.head > 0 {
		// Reuse the front that writers have taken, rather than grow.
		n := copy(w.ready, w.ready[w.head:])
		clear(w.ready[n:])
		w.ready, w.head = w.ready[:n], 0
	}
	w.ready = append(w.ready, st)
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default: // every writer is awake already
	}
}

// idle marks st as no longer being written, then queues it again if
// events came meanwhile (their push saw it busy and left it).
func (st *sseStream) idle() {
	st.busy.Store(false)
	if st.q.Len() > 0 {
		st.ready()
	}
}

// next takes the oldest ready stream, or returns nil if there is none.
func (w *eventWriters) next() *sseStream {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.head == len(w.ready) {
		return nil
	}
	st := w.ready[w.head]
	w.ready[w.head] = nil
	w.head++
	if w.head == len(w.ready) {
		w.ready, w.head = w.ready[:0], 0
	}
	return st
}

// write is one writer: it writes ready streams until the server stops.
func (w *eventWriters) write() {
	defer w.wg.Done()
	for {
		if st := w.next(); st != nil {
			st.flush()
			continue
		}
		select {
		case <-w.wake:
		case <-w.stop:
			return
		}
	}
}

// flush writes everything pending on st in one write, as far as the
// client takes it without blocking; a goroutine of st's own writes the
// rest.
func (st *sseStream) flush() {
	// Every change numbered up to upTo was queued before the drain, so
	// once this batch is out the stream has sent all it must of them.
	upTo := st.w.s.store.published.Load()
	buf := getBuffer()
	batch := st.q.drain()
	b := buf.AvailableBuffer()
	mark := false
	for i := range batch {
		if batch[i].kind == evMark {
			mark = true // its id goes last: a change before upTo may follow it
			continue
		}
		b = st.appendEvent(b, &batch[i])
	}
	if mark {
		b = st.appendMark(b, upTo)
	}
	buf.Write(b) // a grown array stays with buf, for the pool
	st.q.recycle(batch)
	n, err := writeNow(st.raw, buf.Bytes())
	switch {
	case err != nil:
		putBuffer(buf)
		st.Close()
	case n == buf.Len():
		putBuffer(buf)
		st.idle()
	default:
		st.w.slow.Add(1)
		st.w.wg.Add(1)
		go st.finish(buf, n)
	}
}

// finish writes buf from byte n on, blocking, and closes the stream if
// its client has not taken it all within -write-timeout.
func (st *sseStream) finish(buf *bytes.Buffer, n int) {
	defer st.w.wg.Done()
	defer putBuffer(buf)
	st.conn.SetWriteDeadline(time.Now().Add(st.w.s.cfg.writeTimeout))
	if _, err := st.conn.Write(buf.Bytes()[n:]); err != nil {
		st.Close()
		return
	}
	// A deadline left in place would fail the next non-blocking write.
	st.conn.SetWriteDeadline(time.Time{})
	st.idle()
}

// beat queues a heartbeat on every idle event stream, every -heartbeat.
func (w *eventWriters) beat() {
	defer w.wg.Done()
	tick := time.NewTicker(w.s.cfg.heartbeat)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
			w.s.streams.each(func(c io.Closer) {
				if st, ok := c.(*sseStream); ok && st.q.Len() == 0 {
					st.q.push(event{kind: evMark})
				}
			})
		case <-w.stop:
			return
		}
	}
}

// Close ends the stream, once: it unsubscribes and closes the connection.
// A writer that has the stream gets an error from its write and lets go.
// streams.close calls it on shutdown.
func (st *sseStream) Close() error {
	st.closed.Do(func() {
		s := st.w.s
		s.store.Unsubscribe(&st.sub)
		st.conn.Close()
		s.streams.untrack(st)
		s.streams.done()
	})
	return nil
}

// stopWriters stops the writers once every stream is closed.
func (w *eventWriters) stopWriters() {
	close(w.stop)
	w.wg.Wait()
}

// appendEvent appends ev as an SSE message (SPEC sections 4 and 4a):
//
//   - a change or a state: "id: <key>:<revision>:<tag>" and "data:
//     <value>", or revision -1 and null for a missing key; the tag is the
//     change's number once the subscription is synced, and its floor
//     before. A compact JSON value has no newline, so it is always a
//     single data line; nor has a key, which holds no control character;
//   - synced: "event: synced", "id: <seq>", "data: {}";
//   - reset: "event: reset", "data: {}".
func (st *sseStream) appendEvent(b []byte, ev *event) []byte {
	sub := &st.sub
	switch ev.kind {
	case evGone:
		return b
	case evReset:
		return append(b, "event: reset\ndata: {}\n\n"...)
	case evSynced:
		sub.syncing = false
		st.resumeAt = ev.seq
		b = append(b, "event: synced\nid: "...)
		b = strconv.AppendInt(b, ev.seq, 10)
		return append(b, "\ndata: {}\n\n"...)
	}
	tag := sub.floor
	if !sub.syncing {
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

// appendMark appends a comment line, which keeps proxies from dropping an
// idle stream and finds clients that have left, and, once the
// subscription is synced, "id: <upTo>" if that is further on: an event
// with an id and no data moves EventSource's last event id without
// reaching onmessage, so that a quiet stream's resume point keeps up with
// the history and a reconnect after a long quiet resumes rather than
// resets. It goes after the batch, all of which is before upTo.
func (st *sseStream) appendMark(b []byte, upTo int64) []byte {
	b = append(b, ":\n"...)
	if !st.sub.syncing && upTo > st.resumeAt {
		st.resumeAt = upTo
		b = append(b, "id: "...)
		b = strconv.AppendInt(b, upTo, 10)
		b = append(b, '\n')
	}
	return append(b, '\n')
}

// streams counts and stops the long-lived connections (event streams and
// WebSockets), which http.Server.Shutdown does not wait for or close: on
// shutdown, each tracked one is closed.
type streams struct {
	max     int64 // 0: unlimited
	mu      sync.Mutex
	n       int64
	conns   map[io.Closer]bool // closed on shutdown
	wg      sync.WaitGroup
	closing chan struct{}
}

// reserve counts one more stream, or reports false if there are max
// already or the server is closing.
func (c *streams) reserve() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.isClosing() || (c.max > 0 && c.n >= c.max) {
		return false
	}
	c.n++
	c.wg.Add(1)
	return true
}

// isClosing reports whether close has begun.
func (c *streams) isClosing() bool {
	select {
	case <-c.closing:
		return true
	default:
		return false
	}
}

// done counts one stream less.
func (c *streams) done() {
	c.mu.Lock()
	c.n--
	c.mu.Unlock()
	c.wg.Done()
}

// Len returns the number of open streams.
func (c *streams) Len() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

// track has conn closed on shutdown until untrack is called. It reports
// false, and does not track conn, if the server is already closing.
func (c *streams) track(conn io.Closer) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.isClosing() {
		return false
	}
	if c.conns == nil {
		c.conns = make(map[io.Closer]bool)
	}
	c.conns[conn] = true
	return true
}

// untrack undoes track.
func (c *streams) untrack(conn io.Closer) {
	c.mu.Lock()
	delete(c.conns, conn)
	c.mu.Unlock()
}

// each calls f for every tracked connection, under the lock: f must not
// track or untrack.
func (c *streams) each(f func(io.Closer)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for conn := range c.conns {
		f(conn)
	}
}

// close closes every tracked connection and waits until every stream has
// ended.
func (c *streams) close() {
	c.mu.Lock()
	close(c.closing)
	conns := make([]io.Closer, 0, len(c.conns))
	for conn := range c.conns {
		conns = append(conns, conn)
	}
	c.mu.Unlock()
	for _, conn := range conns { // outside the lock: closing may untrack
		conn.Close()
	}
	c.wg.Wait()
}
