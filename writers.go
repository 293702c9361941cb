// The writers of long-lived connections, event streams and WebSockets: a
// few goroutines that write every one's pending events and replies
// without blocking on any client, and the registry of those connections
// that shutdown closes.

package main

import (
	"bytes"
	"net"
	"net/http"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// eventWriters writes the long-lived connections, event streams and
// WebSockets: a few goroutines, one per CPU, take the streams that have
// something pending in the order they became ready, and write each one's
// whole batch with one non-blocking write. A stream whose client does not
// take it all gets a goroutine of its own until the rest is out, so one
// slow client never holds up the others.
//
// A goroutine per stream, the usual design, costs a stack per idle
// subscriber, and under load puts thousands of runnable goroutines ahead
// of everything else, writes included: an update waited for the whole
// fan-out of the previous one. Here the run queue stays short, and a
// stream still waiting its turn when a newer value comes sends only the
// newer one.
type eventWriters struct {
	published    *atomic.Int64 // every change numbered up to it is published
	writeTimeout time.Duration
	heartbeat    time.Duration
	metrics      *metrics
	streams      *streams // the registry, which shutdown closes

	started sync.Once
	stop    chan struct{}
	wg      sync.WaitGroup // the writers, the heartbeat and slow writes

	slow atomic.Int64 // writes left to the slow path: clients that fell behind

	mu    sync.Mutex
	ready []*stream // streams with something pending, from head on
	head  int
	wake  chan struct{} // one token per idle writer to wake
}

// newWriters returns the writers of the streams in registry, one per
// CPU: 82% of their time is the write(2) itself, so fewer would leave
// CPUs idle when the fan-out is the work. (One fewer than the CPUs
// answered writes sooner when the server is overloaded, but had 1.4 times
// the fan-out latency on 2 CPUs when it is not.) They depend on nothing
// above them: the published sequence, the two timings, the metrics and
// the registry.
func newWriters(published *atomic.Int64, writeTimeout, heartbeat time.Duration, m *metrics, registry *streams) *eventWriters {
	return &eventWriters{
		published: published, writeTimeout: writeTimeout, heartbeat: heartbeat, metrics: m, streams: registry,
		stop: make(chan struct{}), wake: make(chan struct{}, runtime.GOMAXPROCS(0)),
	}
}

// stream is a long-lived connection that the writers write: an event
// stream or a WebSocket. What differs between the two, how a batch of
// events becomes bytes, is its protocol's.
type stream struct {
	w     *eventWriters
	conn  net.Conn
	raw   syscall.RawConn // nil: every write takes the slow path
	q     coalescer
	proto protocol
	// busy is set while the stream is queued or being written, so that
	// only one writer has it at a time.
	busy   atomic.Bool
	ended  atomic.Bool // closed: no writer takes it again
	closed sync.Once
	who    identity // with -tokens: closed on reload if its grants change
}

// protocol is what an event stream and a WebSocket do their own way. The
// writer that has the stream calls appendBatch and sent.
type protocol interface {
	// appendBatch appends the bytes of a drained batch. Every change
	// numbered up to upTo was queued before the batch was drained.
	appendBatch(b []byte, batch []event, upTo int64) []byte
	// sent is called when the bytes of the last batch are all written.
	sent()
	// more reports whether there are bytes to send besides the queue's.
	more() bool
	// heartbeat is called every -heartbeat while the stream is idle.
	heartbeat()
	// close ends the protocol's part, before the connection is closed.
	close()
}

// newStream returns a stream for conn, busy until start.
func (w *eventWriters) newStream(conn net.Conn) *stream {
	st := &stream{w: w, conn: conn}
	if sc, ok := conn.(syscall.Conn); ok {
		st.raw, _ = sc.SyscallConn()
	}
	st.busy.Store(true)
	st.q.notify = st.ready
	return st
}

// start hands st to the writers, and has it closed on shutdown.
func (w *eventWriters) start(st *stream) {
	w.started.Do(func() {
		for range cap(w.wake) {
			w.wg.Add(1)
			go w.write()
		}
		w.wg.Add(1)
		go w.beat()
	})
	if !w.streams.track(st) {
		st.Close() // the server is closing
		return
	}
	st.idle()
}

// ready queues st for a writer, unless it is already queued or being
// written. The coalescer calls it after each push.
func (st *stream) ready() {
	if st.ended.Load() || !st.busy.CompareAndSwap(false, true) {
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
// something came meanwhile (a push that saw it busy and left it).
func (st *stream) idle() {
	st.busy.Store(false)
	if st.q.Len() > 0 || st.proto.more() {
		st.ready()
	}
}

// next takes the oldest ready stream, or returns nil if there is none.
func (w *eventWriters) next() *stream {
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
func (st *stream) flush() {
	buf := getBuffer()
	b, weight := st.appendPending(buf.AvailableBuffer(), st.w.published.Load(), st.w.metrics)
	buf.Write(b) // a grown array stays with buf, for the pool
	n, err := writeNow(st.raw, buf.Bytes())
	switch {
	case err != nil:
		putBuffer(buf)
		st.Close()
	case n == buf.Len():
		putBuffer(buf)
		st.sent(weight)
	default:
		st.w.slow.Add(1)
		st.w.wg.Add(1)
		go st.finish(buf, n, weight)
	}
}

// appendPending appends the bytes of what is pending: the batch the queue
// drains, and if it stopped at a state, the state's next chunk. It
// returns the weight of what it took, which stays counted until sent.
// Every change numbered up to upTo was queued before the drain.
func (st *stream) appendPending(b []byte, upTo int64, m *metrics) (_ []byte, weight int64) {
	batch, front := st.q.drain()
	if front != nil {
		upTo = 0 // what waits behind the state was not drained: no heartbeat id
	}
	b = st.proto.appendBatch(b, batch, upTo)
	weight = st.recycle(batch, m)
	if front != nil {
		var chunk [stateChunk + 2]event // the states, and a reset and synced
		states, done := front.read(chunk[:0])
		b = st.proto.appendBatch(b, states, 0)
		m.eventsSent.Add(int64(len(states)))
		if done {
			st.q.endFront()
		}
	}
	return b, weight
}

// sent is called once the bytes of a batch of that weight are written.
func (st *stream) sent(weight int64) {
	st.q.size.Add(-weight)
	st.proto.sent()
	st.idle()
}

// recycle hands a drained batch back to the queue, counts its events
// and those coalesced away before it in the metrics (two atomic adds per
// batch, none per event), and returns its weight.
func (st *stream) recycle(batch []event, m *metrics) (weight int64) {
	var n int64
	for i := range batch {
		ev := &batch[i]
		weight += ev.weight()
		switch ev.kind {
		case evGone, evHeartbeat, evReply:
		default:
			n++
		}
	}
	if n > 0 {
		m.eventsSent.Add(n)
	}
	if d := st.q.recycle(batch); d > 0 {
		m.eventsCoalesced.Add(d)
	}
	return weight
}

// finish writes buf from byte n on, blocking, and closes the stream if
// its client has not taken it all within -write-timeout.
func (st *stream) finish(buf *bytes.Buffer, n int, weight int64) {
	defer st.w.wg.Done()
	defer putBuffer(buf)
	st.conn.SetWriteDeadline(time.Now().Add(st.w.writeTimeout))
	if _, err := st.conn.Write(buf.Bytes()[n:]); err != nil {
		st.Close()
		return
	}
	// A deadline left in place would fail the next non-blocking write.
	st.conn.SetWriteDeadline(time.Time{})
	st.sent(weight)
}

// beat tells every idle stream's protocol, every -heartbeat.
func (w *eventWriters) beat() {
	defer w.wg.Done()
	tick := time.NewTicker(w.heartbeat)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
			w.streams.each(func(st *stream) {
				if st.q.Len() == 0 {
					st.proto.heartbeat()
				}
			})
		case <-w.stop:
			return
		}
	}
}

// Close ends the stream, once: its protocol's part, then the connection.
// A writer that has the stream gets an error from its write and lets go.
// streams.close calls it on shutdown.
func (st *stream) Close() error {
	st.closed.Do(func() {
		st.ended.Store(true)
		st.q.close()
		st.proto.close()
		st.conn.Close()
		st.w.streams.untrack(st)
	})
	return nil
}

// stopWriters stops the writers once every stream is closed.
func (w *eventWriters) stopWriters() {
	close(w.stop)
	w.wg.Wait()
}

// streams counts and stops the long-lived connections (event streams and
// WebSockets), which http.Server.Shutdown does not wait for or close: on
// shutdown, each tracked one is closed.
type streams struct {
	max     int64 // 0: unlimited
	mu      sync.Mutex
	n       int64
	conns   map[*stream]struct{} // closed on shutdown
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

// admit reserves a slot for a new long-lived connection, an event stream
// or a WebSocket, before anything of it starts; or answers 503 and reports
// false: -max-subscribers are open, or the server is closing. It is the
// one admission of both, and its one refusal. The caller that was
// admitted calls s.streams.done once the connection ends.
func (s *server) admit(w http.ResponseWriter) bool {
	if !s.streams.reserve() {
		serveError(w, http.StatusServiceUnavailable, "too many subscribers (-max-subscribers): try again later")
		return false
	}
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
func (c *streams) track(st *stream) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.isClosing() {
		return false
	}
	if c.conns == nil {
		c.conns = make(map[*stream]struct{})
	}
	c.conns[st] = struct{}{}
	return true
}

// untrack undoes track.
func (c *streams) untrack(conn *stream) {
	c.mu.Lock()
	delete(c.conns, conn)
	c.mu.Unlock()
}

// each calls f for every tracked connection, under the lock: f must not
// track or untrack.
func (c *streams) each(f func(*stream)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for conn := range c.conns {
		f(conn)
	}
}

// closeIf closes every tracked stream for which drop reports true, and
// returns how many.
func (c *streams) closeIf(drop func(*stream) bool) int {
	var doomed []*stream
	c.mu.Lock()
	for st := range c.conns {
		if drop(st) {
			doomed = append(doomed, st)
		}
	}
	c.mu.Unlock()
	for _, conn := range doomed { // outside the lock: closing untracks
		conn.Close()
	}
	return len(doomed)
}

// close closes every tracked connection and waits until every stream has
// ended.
func (c *streams) close() {
	c.mu.Lock()
	close(c.closing)
	conns := make([]*stream, 0, len(c.conns))
	for conn := range c.conns {
		conns = append(conns, conn)
	}
	c.mu.Unlock()
	for _, conn := range conns { // outside the lock: closing may untrack
		conn.Close()
	}
	c.wg.Wait()
}
