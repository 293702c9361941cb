package main

import (
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// event is one change of a key as a subscriber receives it, or, with raw
// set, a reply to send as it is (the WebSocket API queues its replies with
// its events, so both leave in order).
type event struct {
	key string
	e   *entry // nil: the key is missing (deleted or expired)
	why reason
	raw []byte
}

// coalescer is the queue between the publishers and one subscriber. It
// holds at most one pending event per key: a newer change of a key that is
// already pending replaces it in place, so a subscriber that cannot keep
// up skips intermediate revisions but always gets the latest, and its
// memory is bounded by the number of keys it watches. Pushing never
// blocks, and once the pending set has grown to its working size it does
// not allocate.
type coalescer struct {
	wake   chan struct{} // signalled after a push, unless notify is set
	notify func()        // called after a push instead, if not nil

	mu      sync.Mutex
	pending []event
	index   map[string]int // key -> position in pending
	spare   []event        // the slice of the last batch, for reuse
}

func newCoalescer() *coalescer {
	return &coalescer{wake: make(chan struct{}, 1)}
}

// push queues ev.
func (q *coalescer) push(ev event) {
	q.mu.Lock()
	if i, ok := q.index[ev.key]; ok && ev.raw == nil {
		q.pending[i] = ev
	} else {
		if ev.raw == nil {
			if q.index == nil {
				q.index = make(map[string]int)
			}
			q.index[ev.key] = len(q.pending)
		}
		q.pending = append(q.pending, ev)
	}
	q.mu.Unlock()
	if q.notify != nil {
		q.notify()
		return
	}
	select {
	case q.wake <- struct{}{}:
	default: // already signalled
	}
}

// drain takes every pending event, in the order they were first queued.
// The caller hands the batch back with recycle when it is done with it.
func (q *coalescer) drain() []event {
	q.mu.Lock()
	defer q.mu.Unlock()
	batch := q.pending
	q.pending = q.spare[:0]
	q.spare = nil
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
	return len(q.pending)
}

// handleEvents answers GET of a path with Accept: text/event-stream: the
// Server-Sent Events stream of the changes of path. With ?initial or a
// Last-Event-ID header, the stream first holds the current state.
//
// The connection is hijacked: once the headers are out, the handler
// returns and one goroutine of the stream's own writes events to the bare
// connection. net/http would otherwise keep its buffers, a background
// reader and its deep stack alive for every idle stream.
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
	q := newCoalescer()
	_, initial := r.URL.Query()["initial"]
	initial = initial || r.Header.Get("Last-Event-ID") != ""
	s.store.Subscribe(path, q, initial)

	// The head and the retry hint go out at once, so the client knows the
	// stream is open before any change happens.
	buf.Writer.WriteString("HTTP/1.1 200 OK\r\n")
	h.Write(buf.Writer)
	buf.Writer.WriteString("\r\nretry: 2000\n\n")
	deadline := time.Now().Add(s.cfg.writeTimeout)
	conn.SetWriteDeadline(deadline)
	if err := buf.Writer.Flush(); err != nil {
		s.store.Unsubscribe(path, q)
		conn.Close()
		s.streams.done()
		return
	}
	st := &sseStream{conn: conn, q: q, deadline: deadline}
	go func() {
		defer s.streams.done()
		defer conn.Close()
		defer s.store.Unsubscribe(path, q)
		st.run(s.streams.closing, s.cfg.heartbeat, s.cfg.writeTimeout)
	}()
}

// sseStream writes one subscriber's events to its connection.
type sseStream struct {
	conn     net.Conn
	q        *coalescer
	deadline time.Time // the connection's write deadline
}

// run writes batches of events until the connection fails, a write stalls
// for writeTimeout, or closing is closed. A comment line every heartbeat
// keeps proxies from dropping the stream and finds clients that left.
func (st *sseStream) run(closing <-chan struct{}, heartbeat, writeTimeout time.Duration) {
	tick := time.NewTicker(heartbeat)
	defer tick.Stop()
	for {
		var err error
		select {
		case <-st.q.wake:
			batch := st.q.drain()
			err = st.write(writeTimeout, func(b []byte) []byte {
				for _, ev := range batch {
					b = appendSSE(b, ev)
				}
				return b
			})
			st.q.recycle(batch)
		case <-tick.C:
			err = st.write(writeTimeout, func(b []byte) []byte { return append(b, ":\n"...) })
		case <-closing:
			return
		}
		if err != nil {
			return
		}
	}
}

// write encodes with fill into a pooled buffer and writes it in one call.
// An idle stream holds no buffer.
func (st *sseStream) write(timeout time.Duration, fill func([]byte) []byte) error {
	buf := getBuffer()
	defer putBuffer(buf)
	buf.Write(fill(buf.AvailableBuffer())) // a grown array stays with buf, for the pool
	// Moving the deadline costs a runtime timer update; doing it only once
	// half of it is used still closes a stalled stream after between half
	// the timeout and the whole of it.
	if now := time.Now(); st.deadline.Sub(now) < timeout/2 {
		st.deadline = now.Add(timeout)
		st.conn.SetWriteDeadline(st.deadline)
	}
	_, err := st.conn.Write(buf.Bytes())
	return err
}

// appendSSE appends ev as an SSE message: "id: /key:<revision>" and "data:
// <value>", or revision -1 and null for a missing key. A compact JSON value
// has no newline, so it is always a single data line.
func appendSSE(b []byte, ev event) []byte {
	b = append(b, "id: "...)
	b = append(b, ev.key...)
	b = append(b, ':')
	if ev.e == nil {
		b = append(b, "-1\ndata: null\n\n"...)
		return b
	}
	b = strconv.AppendInt(b, ev.e.revision, 10)
	b = append(b, "\ndata: "...)
	b = append(b, ev.e.value...)
	return append(b, "\n\n"...)
}

// streams counts and stops the long-lived connections (event streams and
// WebSockets), which http.Server.Shutdown does not wait for or close.
// Event streams watch closing; idle WebSockets have no goroutine that
// could, so their connections are closed for them.
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
	select {
	case <-c.closing:
		return false
	default:
	}
	if c.max > 0 && c.n >= c.max {
		return false
	}
	c.n++
	c.wg.Add(1)
	return true
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
func (c *streams) track(conn io.Closer) (untrack func(), ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	select {
	case <-c.closing:
		return nil, false
	default:
	}
	if c.conns == nil {
		c.conns = make(map[io.Closer]bool)
	}
	c.conns[conn] = true
	return func() {
		c.mu.Lock()
		delete(c.conns, conn)
		c.mu.Unlock()
	}, true
}

// close tells every stream to end and waits until they have.
func (c *streams) close() {
	c.mu.Lock()
	close(c.closing)
	for conn := range c.conns {
		conn.Close()
	}
	c.mu.Unlock()
	c.wg.Wait()
}
