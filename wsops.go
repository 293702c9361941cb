package main

// The messages of the WebSocket API: the table of ops a client may send,
// each answered by one short method, and the replies they queue. ws.go
// holds the connection they arrive on; README.md and docs/websocket.md
// list every message.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
)

// wsMessage is a client's message. A value stays raw, never decoded.
type wsMessage struct {
	Type    string          `json:"type"`
	Payload *wsPayload      `json:"payload"`
	ID      json.RawMessage `json:"id"`
}

// wsPayload holds every payload field of every message type.
type wsPayload struct {
	Key      *string         `json:"key"`
	Prefix   *string         `json:"prefix"`
	Value    json.RawMessage `json:"value"`
	Revision *int64          `json:"revision"`
	TTL      json.RawMessage `json:"ttl"`
	Initial  bool            `json:"initial"`
	Since    json.RawMessage `json:"since"`
	Limit    *int64          `json:"limit"`
	After    *string         `json:"after"`
	Shallow  bool            `json:"shallow"`
	Check    json.RawMessage `json:"check"`
	Ops      json.RawMessage `json:"ops"`
}

// wsOp is one message type of the WebSocket API: its name, what its
// payload names and the permission that needs, and the method that
// answers it. handle checks both, in one place, before the method runs.
type wsOp struct {
	typ    string
	names  wsTarget
	perm   perm
	answer func(c *wsConn, r wsRequest)
}

// wsTarget is what a message's payload names.
type wsTarget uint8

const (
	namesKey    wsTarget = iota // "key": a key
	namesPath                   // "key": a key, a prefix ending with "/", or "/"
	namesPrefix                 // "prefix": a prefix ("/" if absent; the "/" at its end may be left out)
	namesKeys                   // several keys, which the op checks itself (txn)
)

// wsOps is every message type a client may send, in the order the
// documentation lists them, and the error for an unknown one (wsOpList).
var wsOps = []wsOp{
	{"get", namesKey, permRead, (*wsConn).get},
	{"set", namesKey, permWrite, (*wsConn).set},
	{"update", namesKey, permWrite, (*wsConn).update},
	{"delete", namesKey, permWrite, (*wsConn).delete},
	{"subscribe", namesPath, permRead, (*wsConn).subscribe},
	{"unsubscribe", namesPath, permNone, (*wsConn).unsubscribe},
	{"list", namesPrefix, permRead, (*wsConn).list},
	{"txn", namesKeys, permNone, (*wsConn).txn}, // each key checked by the op (allowTxn)
}

// wsOpOf returns the op of a message type. Seven string comparisons at
// most: a map would not be faster.
func wsOpOf(typ string) (wsOp, bool) {
	for _, op := range wsOps {
		if op.typ == typ {
			return op, true
		}
	}
	return wsOp{}, false
}

// wsOpList names every message type, for the error that answers an
// unknown one: "get, set, … or list".
var wsOpList = func() string {
	types := make([]string, len(wsOps))
	for i, op := range wsOps {
		types[i] = op.typ
	}
	return strings.Join(types[:len(types)-1], ", ") + " or " + types[len(types)-1]
}()

// wsRequest is a message being answered, with what it names checked:
// the store's key or path, and as the client spelled it, which replies
// repeat ("foo" or "/foo").
type wsRequest struct {
	typ      string
	id       json.RawMessage
	p        wsPayload
	key      string
	spelled  string
	kvserver bool
	msg      []byte // the whole message, until handle returns
}

// handle answers one message: it finds its op, checks what the payload
// names and that the connection may do the op on it, and runs the op. A
// write refused here counts in the metrics as any write does.
func (c *wsConn) handle(data []byte) {
	msg, p, err := decodeMessage(data)
	if err != nil {
		c.fail(msg.ID, err)
		return
	}
	op, ok := wsOpOf(msg.Type)
	if !ok {
		c.fail(msg.ID, fmt.Errorf("unknown message type %q: want %s", msg.Type, wsOpList))
		return
	}
	r := wsRequest{typ: msg.Type, id: msg.ID, p: p, msg: data}
	if err := c.target(op, &r); err != nil && op.perm == permWrite {
		c.failWrite(r.id, err)
		return
	} else if err != nil {
		c.fail(r.id, err)
		return
	}
	op.answer(c, r)
}

// target reads and checks what r's payload names for op, and whether the
// connection may do op on it.
func (c *wsConn) target(op wsOp, r *wsRequest) error {
	switch {
	case op.names == namesKeys:
		return nil
	case op.names == namesPrefix:
		r.spelled = "/"
		if r.p.Prefix != nil {
			r.spelled = *r.p.Prefix
		}
		if r.spelled != "" && !strings.HasSuffix(r.spelled, "/") {
			r.spelled += "/" // "" is KvServer's spelling of "/"
		}
	case r.p.Key == nil && op.names == namesPath:
		return fmt.Errorf(`%s: missing "key": a key, a prefix ending with "/", or "/"`, r.typ)
	case r.p.Key == nil:
		return fmt.Errorf(`%s: missing "key"`, r.typ)
	default:
		r.spelled = *r.p.Key
	}
	var err error
	if r.key, r.kvserver, err = checkSpelled(r.spelled, c.s.cfg.maxKeyBytes, op.names == namesKey); err != nil {
		return err
	}
	return c.allow(r.key, op.perm)
}

// fail replies with an error, in the words of every interface.
func (c *wsConn) fail(id json.RawMessage, err error) {
	c.reply(id, outcomeTable[outcomeOf(err)].ws, appendJSONString(nil, c.s.errorMessage(err)))
}

// failWrite replies with an error to a write, and counts it.
func (c *wsConn) failWrite(id json.RawMessage, err error) {
	c.s.metrics.wrote(err)
	c.fail(id, err)
}

func (c *wsConn) get(r wsRequest) {
	if err := c.s.store.journal.current(c.ctx); err != nil {
		c.fail(r.id, err)
		return
	}
	if e := c.s.store.Get(r.key); e != nil {
		c.replyItem(r.id, "value", r.spelled, e)
	} else {
		c.reply(r.id, "no-value", appendKeyPayload(nil, r.spelled))
	}
}

func (c *wsConn) set(r wsRequest) {
	value, ttl, err := c.s.valueAndTTL(r.p.Value, r.p.TTL)
	if err != nil {
		c.failWrite(r.id, err)
		return
	}
	e, err := c.s.store.Set(r.key, value, ttl)
	c.answerWrite(r.id, r.spelled, err, false, func() []byte { return appendRevisionPayload(nil, r.spelled, e.revision) })
}

func (c *wsConn) update(r wsRequest) {
	value, ttl, err := c.s.valueAndTTL(r.p.Value, r.p.TTL)
	if err == nil && r.p.Revision == nil {
		err = errors.New(`update: missing "revision": the revision the write will have (0 to create)`)
	}
	if err != nil {
		c.failWrite(r.id, err)
		return
	}
	e, err := c.s.store.CompareAndSwap(r.key, value, *r.p.Revision, ttl)
	c.answerWrite(r.id, r.spelled, err, true, func() []byte { return appendRevisionPayload(nil, r.spelled, e.revision) })
}

func (c *wsConn) delete(r wsRequest) {
	rev := int64(-1)
	if r.p.Revision != nil {
		rev = *r.p.Revision
	}
	_, err := c.s.store.Delete(r.key, rev)
	c.answerWrite(r.id, r.spelled, err, false, func() []byte { return appendKeyPayload(nil, r.spelled) })
}

// subscribe registers a subscription under the path as the client spelled
// it. Its ok is queued with the registration (see Subscribe): before any
// of its events, and not before a change made after it could be missed.
// Subscribing again under the same spelling keeps the subscription, and
// queues only the state it asks for, if any: no second registration, no
// second copy of anything. A new spelling past -max-subscriptions is
// refused.
func (c *wsConn) subscribe(r wsRequest) {
	sub := c.subs[r.spelled]
	if sub == nil && len(c.subs) >= c.s.cfg.maxWSSubs {
		c.fail(r.id, fmt.Errorf("subscribe %s: this connection has %d subscriptions, the most it may (-max-subscriptions): unsubscribe first", quoteKey(r.spelled), len(c.subs)))
		return
	}
	from := subscribeFrom(r.p)
	if from != fromNow {
		// A state shows every change committed before the request.
		if err := c.s.store.journal.current(c.ctx); err != nil {
			c.fail(r.id, err)
			return
		}
	}
	ok := &wsReply{} // nothing to send (KvServer's subscribe has no reply), only its place
	if r.id != nil {
		ok = message(r.id, "ok", appendKeyPayload(nil, r.spelled))
	}
	if sub == nil {
		sub = &subscription{path: r.key, q: &c.st.q, kvserver: r.kvserver}
		c.subs[r.spelled] = sub
	}
	c.s.store.Subscribe(sub, from, ok)
}

// unsubscribe's ok is queued after the subscription is gone, so no event
// of it follows the ok.
func (c *wsConn) unsubscribe(r wsRequest) {
	if sub := c.subs[r.spelled]; sub != nil {
		delete(c.subs, r.spelled)
		c.s.store.Unsubscribe(sub)
	}
	if r.id != nil {
		c.reply(r.id, "ok", appendKeyPayload(nil, r.spelled))
	}
}

// list queues a listing of the prefix, read from the store as the
// connection drains (wsListing): without limit, after or shallow, the
// array of every key under it (values [...], as KvServer's clients
// expect); with any, {items, seq, next?} (SPEC 3a).
func (c *wsConn) list(r wsRequest) {
	var limit *string
	if r.p.Limit != nil {
		n := strconv.FormatInt(*r.p.Limit, 10)
		limit = &n
	}
	after := ""
	if r.p.After != nil && *r.p.After != "" {
		after, _ = storePath(*r.p.After)
		if !r.kvserver {
			after = *r.p.After
		}
	}
	q, err := parseListQuery(limit, after, r.p.Shallow, c.s.cfg.maxKeyBytes)
	if err != nil {
		c.fail(r.id, fmt.Errorf("list: %w", err))
		return
	}
	if err := c.s.store.journal.current(c.ctx); err != nil {
		c.fail(r.id, err)
		return
	}
	paged := r.p.Limit != nil || r.p.After != nil || r.p.Shallow
	l := &wsListing{c: c, l: c.s.store.list(r.key, q.after, q.shallow), id: r.id, kvserver: r.kvserver, paged: paged, limit: q.limit}
	c.st.q.push(event{kind: evCursor, state: l})
}

// txn answers a transaction (SPEC 11): ok {seq, revisions}, or conflict
// {conflicts}, keys spelled as the client spelled them; or an error.
// Each key is checked, and the access to it, before any check is
// evaluated.
func (c *wsConn) txn(r wsRequest) {
	// The payload is read again, whole and strictly, as POST / reads its
	// body: a misspelt "checks" must not make a transaction unconditional.
	var m struct{ Payload json.RawMessage }
	json.Unmarshal(r.msg, &m) // it parsed once already
	req, err := c.s.parseTxn(m.Payload, true)
	if err == nil {
		err = c.s.allowTxn(c.st.who.caller, req)
	}
	if err == nil {
		err = c.s.store.Commit(req.t)
	}
	c.s.metrics.wrote(err)
	var conflict *conflictError
	switch {
	case errors.As(err, &conflict):
		c.reply(r.id, "conflict", append(appendConflicts([]byte(`{"conflicts":`), req, conflict, c.s.store.now()), '}'))
	case err != nil:
		c.fail(r.id, fmt.Errorf("txn: %w", err))
	default:
		c.reply(r.id, "ok", appendTxnDone(nil, req))
	}
}

// wsListing is a list request's answer in progress: one message, sent in
// fragments (RFC 6455 5.4) as the listing is read, a chunk at a time, as
// the connection drains, so that a listing holds the same few hundred
// bytes whatever the prefix holds (SPEC 10). What is queued behind it
// waits, as behind a state.
type wsListing struct {
	c        *wsConn
	l        *listing
	id       json.RawMessage
	kvserver bool
	paged    bool // {items, seq, next?}, not the bare array
	limit    int  // paged: the most items; 0: all

	mu      sync.Mutex // of close, which the stream's end may call
	sent    int
	started bool
	closed  bool
}

// read appends the next fragment of the message: the head and the first
// items, more items, or the last items and the tail.
func (w *wsListing) read(out []event) ([]event, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return out, true
	}
	var b []byte
	if !w.started {
		b = []byte(`{"type":"values","payload":[`)
		if w.paged {
			b = []byte(`{"type":"values","payload":{"items":[`)
		}
	}
	n := stateChunk
	if w.limit > 0 {
		n = min(n, w.limit-w.sent)
	}
	var chunk [stateChunk]item
	items, err := w.l.next(chunk[:0], n, chunkBytes)
	if err != nil {
		// Part of the message is out, and it cannot be finished truly.
		w.c.out.close(&wsCloseError{closeInternal, "list: " + err.Error()})
		w.close()
		return out, true
	}
	if w.sent > 0 && len(items) > 0 {
		b = append(b, ',')
	}
	b = appendItems(b, items, w.kvserver, w.c.s.store.now())
	w.sent += len(items)
	done := w.l.done() || w.limit > 0 && w.sent == w.limit
	if done {
		b = append(b, ']')
		if w.paged {
			b = append(b, `,"seq":`...)
			b = strconv.AppendInt(b, w.l.seq(), 10)
			if w.limit > 0 && w.sent == w.limit {
				last := items[len(items)-1].key
				if more, _ := w.l.next(chunk[:0], 1, 0); len(more) > 0 {
					b = append(b, `,"next":`...)
					b = appendKey(b, spell(last, w.kvserver))
				}
			}
			b = append(b, '}')
		}
		b = append(appendID(b, w.id), '}')
		w.close()
	}
	frame := fragMore
	switch {
	case !w.started && done:
		frame = fragWhole
	case !w.started:
		frame = fragFirst
	case done:
		frame = fragLast
	}
	w.started = true
	return append(out, event{kind: evReply, reply: &wsReply{head: b, size: int64(len(b)), frame: frame}}), done
}

// close ends the listing. w.mu must be held.
func (w *wsListing) close() {
	if !w.closed {
		w.closed = true
		w.l.close()
	}
}

// drop lets go of the snapshot of a listing that never began.
func (w *wsListing) drop() { w.l.close() }

func (w *wsListing) stopWalk() {
	w.mu.Lock()
	w.close()
	w.mu.Unlock()
}

// subscribeFrom says where a subscribe message starts: after since, a
// change number, if given (a since that is not a positive integer cannot
// be resumed from: it resets); else from scratch if initial; else now.
func subscribeFrom(p wsPayload) int64 {
	if p.Since != nil && string(p.Since) != "null" {
		return resumePoint(strings.Trim(string(p.Since), `"`))
	}
	if p.Initial {
		return fromScratch
	}
	return fromNow
}

// decodeMessage parses a message and its payload, in one pass. On error
// the message holds whatever id could be read, so the error can echo it.
// The message is valid UTF-8 (wsReader checks it, as RFC 6455 asks), so
// encoding/json cannot quietly turn bad bytes of a key into U+FFFD.
func decodeMessage(data []byte) (wsMessage, wsPayload, error) {
	var msg wsMessage
	err := json.Unmarshal(data, &msg)
	// Unmarshal goes on past a member of the wrong type, so the type and
	// id are read whatever their place in the message.
	var typeErr *json.UnmarshalTypeError
	switch {
	case err == nil:
	case !errors.As(err, &typeErr):
		return msg, wsPayload{}, fmt.Errorf("invalid message: not JSON: %v", err)
	case typeErr.Field == "":
		return msg, wsPayload{}, errors.New(`invalid message: want a JSON object {"type": …, "payload": …}`)
	case typeErr.Field == "payload":
		return msg, wsPayload{}, fmt.Errorf(`%s: "payload" must be an object`, msg.Type)
	case strings.HasPrefix(typeErr.Field, "payload."):
		field := strings.TrimPrefix(typeErr.Field, "payload.")
		return msg, wsPayload{}, fmt.Errorf("%s: %q must be %s", msg.Type, field, wantType(field))
	default:
		return msg, wsPayload{}, fmt.Errorf("invalid message: %q must be %s", typeErr.Field, wantType(typeErr.Field))
	}
	if msg.Type == "" {
		return msg, wsPayload{}, errors.New(`invalid message: missing "type"`)
	}
	if msg.Payload == nil {
		return msg, wsPayload{}, fmt.Errorf(`%s: missing "payload"`, msg.Type)
	}
	return msg, *msg.Payload, nil
}

func wantType(field string) string {
	switch field {
	case "revision":
		return "an integer"
	case "initial", "shallow":
		return "true or false"
	case "limit":
		return "an integer"
	case "check", "ops":
		return "an array"
	}
	return "a string"
}

// allow returns nil if the connection's token lets it do p on path.
func (c *wsConn) allow(path string, p perm) error {
	if err := c.s.access.allow(c.st.who.caller, path, p); err != nil {
		return err
	}
	return nil // not the nil *accessError, which is a non-nil error
}

// answerWrite replies to a write of key that ended with err: conflict
// with the current state, or error, or ok with the payload ok makes, sent
// if always or if the message had an id (KvServer's writes are silent).
func (c *wsConn) answerWrite(id json.RawMessage, key string, err error, always bool, ok func() []byte) {
	c.s.metrics.wrote(err)
	var conflict *conflictError
	switch {
	case errors.As(err, &conflict):
		c.replyItem(id, "conflict", key, conflict.cur())
	case err != nil:
		c.fail(id, err)
	case always || id != nil:
		c.reply(id, "ok", ok())
	}
}

// wsReply is a reply to a WebSocket client: its message; or for a get, a
// conflict or a list, what to build it from when it is written (items,
// by appendItem), so that a queued reply shares the stored values rather
// than copying them.
type wsReply struct {
	head     []byte // the message, or what comes before the items
	items    []item // a get's or conflict's key and version, or a list's
	kvserver bool   // the items' keys are named without the leading "/"
	now      int64  // when the reply was made, for the items' TTLs
	tail     []byte // what comes after the items
	size     int64  // of the message, about: counted against the bound
	frame    uint8  // which part of its message it is (a listing's)
	start    int64  // a subscribe's: the connection's resume point once it is written
}

// empty reports whether the reply has nothing to send.
func (r *wsReply) empty() bool { return len(r.head) == 0 && r.items == nil && len(r.tail) == 0 }

// Which part of a message in fragments a reply is.
const (
	fragWhole uint8 = iota // the whole message
	fragFirst
	fragMore
	fragLast
)

// append appends the reply's message.
func (r *wsReply) append(b []byte) []byte {
	b = append(b, r.head...)
	for i, it := range r.items {
		if i > 0 {
			b = append(b, ',')
		}
		it.key = spell(it.key, r.kvserver)
		b = appendItem(b, it, r.now)
	}
	return append(b, r.tail...)
}

// push queues a reply. Its bytes count against the bound from now until
// a writer has sent them.
func (c *wsConn) push(r *wsReply) {
	c.st.q.push(event{kind: evReply, reply: r})
}

// reply queues {"type": typ, "payload": payload[, "id": id]}.
func (c *wsConn) reply(id json.RawMessage, typ string, payload []byte) {
	c.push(message(id, typ, payload))
}

// message returns the reply {"type": typ, "payload": payload[, "id": id]}.
func message(id json.RawMessage, typ string, payload []byte) *wsReply {
	b := make([]byte, 0, len(payload)+len(typ)+len(id)+32)
	b = append(b, `{"type":"`...)
	b = append(b, typ...)
	b = append(b, `","payload":`...)
	b = append(b, payload...)
	b = appendID(b, id)
	b = append(b, '}')
	return &wsReply{head: b, size: int64(len(b))}
}

// appendID appends the "id" member of a reply to a message with id, if
// it had one.
func appendID(b []byte, id json.RawMessage) []byte {
	if id == nil {
		return b
	}
	b = append(b, `,"id":`...)
	if !bytes.ContainsAny(id, " \t\r\n") {
		return append(b, id...) // as it came: compact already
	}
	var compact bytes.Buffer
	json.Compact(&compact, id) // id came from a message that parsed
	return append(b, compact.Bytes()...)
}

// replyItem queues typ {key, value, revision[, ttl]}: key, as the client
// spelled it, at version e (nil: missing), sharing its value. It answers
// a get (value) and a write that lost (conflict, with the current state).
func (c *wsConn) replyItem(id json.RawMessage, typ, key string, e *entry) {
	r := &wsReply{items: []item{{key, e}}, now: c.s.store.now()}
	r.head = append(append([]byte(`{"type":"`), typ...), `","payload":`...)
	r.tail = append(appendID(nil, id), '}')
	r.size = int64(len(r.head)+len(r.tail)+len(key)) + 48 // the members around them, about
	if e != nil {
		r.size += int64(len(e.value))
	}
	c.push(r)
}

func appendKeyPayload(b []byte, key string) []byte {
	b = append(b, `{"key":`...)
	b = appendKey(b, key)
	return append(b, '}')
}

func appendRevisionPayload(b []byte, key string, rev int64) []byte {
	b = append(b, `{"key":`...)
	b = appendKey(b, key)
	b = append(b, `,"revision":`...)
	b = strconv.AppendInt(b, rev, 10)
	return append(b, '}')
}

func appendJSONString(b []byte, s string) []byte {
	q, _ := json.Marshal(s)
	return append(b, q...)
}
