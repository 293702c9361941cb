// Transactions (SPEC section 11): several keys, one atomic change. This
// file reads a transaction from JSON, checks what the caller may do, and
// writes the answers; the HTTP API (POST /) and the WebSocket API (txn)
// both use it, and the store commits it (Store.Commit) as it commits
// every write.

package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
)

// txnRequest is a transaction as a client sends it: its keys as the
// client spelled them (over the WebSocket, perhaps KvServer's way), which
// the answers repeat, and the transaction itself, with the store's keys.
type txnRequest struct {
	t       *txn
	checks  []string // the spelling of each check's key
	ops     []string // the spelling of each op's key
	kvwords bool     // KvServer spellings are allowed (the WebSocket)
}

// txnJSON is what a transaction holds: checks and ops.
type txnJSON struct {
	Check []struct {
		Key      *string `json:"key"`
		Revision *int64  `json:"revision"`
	} `json:"check"`
	Ops []struct {
		Op    string          `json:"op"`
		Key   *string         `json:"key"`
		Value json.RawMessage `json:"value"`
		TTL   json.RawMessage `json:"ttl"`
	} `json:"ops"`
}

// parseTxn reads a transaction from a request's body or a WebSocket txn's
// payload, {"check", "ops"}, and checks it (parseTxnParts). A member it does not know is an
// error: a misspelt "checks" must not make a transaction unconditional.
func (s *server) parseTxn(body []byte, kvserver bool) (*txnRequest, error) {
	var parts struct {
		Check json.RawMessage `json:"check"`
		Ops   json.RawMessage `json:"ops"`
	}
	if err := decodeStrict(body, &parts); err != nil {
		return nil, err
	}
	return s.parseTxnParts(parts.Check, parts.Ops, kvserver)
}

// decodeStrict decodes one JSON value into v, refusing members v does
// not have.
func decodeStrict(raw []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf(`invalid transaction: %v: want {"check"?: [{"key", "revision"}…], "ops": [{"op": "set"|"delete", "key", "value"?, "ttl"?}…]}`, jsonProblem(err))
	}
	if dec.More() {
		return errors.New("invalid transaction: more than one JSON value")
	}
	return nil
}

// parseTxnParts reads a transaction's checks and ops and checks them as
// SPEC 11 says: keys, ops, values and TTLs, no key twice among the ops,
// at least one op and at most -max-txn-ops ops and as many checks.
// kvserver allows KvServer's spellings of keys (the WebSocket's). An
// error names what is wrong; a value past -max-value-bytes is a
// *tooLargeError.
func (s *server) parseTxnParts(checks, ops json.RawMessage, kvserver bool) (*txnRequest, error) {
	var j txnJSON
	if checks != nil && string(checks) != "null" {
		if err := decodeStrict(checks, &j.Check); err != nil {
			return nil, err
		}
	}
	if ops != nil {
		if err := decodeStrict(ops, &j.Ops); err != nil {
			return nil, err
		}
	}
	max := s.cfg.maxTxnOps
	switch {
	case len(j.Ops) == 0:
		return nil, errors.New(`invalid transaction: no "ops": at least one op is needed`)
	case len(j.Ops) > max:
		return nil, fmt.Errorf("invalid transaction: %d ops, more than %d (-max-txn-ops)", len(j.Ops), max)
	case len(j.Check) > max:
		return nil, fmt.Errorf("invalid transaction: %d checks, more than %d (-max-txn-ops)", len(j.Check), max)
	}
	r := &txnRequest{t: &txn{}, kvwords: kvserver}
	t := r.t
	for i, c := range j.Check {
		where := fmt.Sprintf("check[%d]", i)
		if c.Key == nil || c.Revision == nil {
			return nil, fmt.Errorf(`invalid transaction: %s: want {"key": …, "revision": …} (-1: missing)`, where)
		}
		key, err := s.txnKey(*c.Key, kvserver, where)
		if err != nil {
			return nil, err
		}
		if *c.Revision < noRevision {
			return nil, fmt.Errorf("invalid transaction: %s: revision %d: want a revision >= 0, or -1 for missing", where, *c.Revision)
		}
		t.checks = append(t.checks, check{key, *c.Revision})
		r.checks = append(r.checks, *c.Key)
	}
	seen := make(map[string]int, len(j.Ops))
	for i, o := range j.Ops {
		where := fmt.Sprintf("ops[%d]", i)
		if o.Key == nil {
			return nil, fmt.Errorf(`invalid transaction: %s: missing "key"`, where)
		}
		key, err := s.txnKey(*o.Key, kvserver, where)
		if err != nil {
			return nil, err
		}
		if first, dup := seen[key]; dup {
			return nil, fmt.Errorf("invalid transaction: %s: key %s is already in ops[%d]: a key may appear once among the ops", where, quoteKey(*o.Key), first)
		}
		seen[key] = i
		var p op
		switch o.Op {
		case "set":
			value, ttl, err := s.valueAndTTL(o.Value, o.TTL)
			if err != nil {
				return nil, fmt.Errorf("invalid transaction: %s: %w", where, err)
			}
			p = op{key: key, value: value, ttl: ttl}
		case "delete":
			if o.Value != nil || o.TTL != nil {
				return nil, fmt.Errorf(`invalid transaction: %s: a delete takes no "value" or "ttl"`, where)
			}
			p = op{key: key, del: true}
		case "":
			return nil, fmt.Errorf(`invalid transaction: %s: missing "op": want "set" or "delete"`, where)
		default:
			return nil, fmt.Errorf(`invalid transaction: %s: unknown op %q: want "set" or "delete"`, where, o.Op)
		}
		t.ops = append(t.ops, p)
		r.ops = append(r.ops, *o.Key)
	}
	return r, nil
}

// txnKey checks a key of a transaction, spelled as the client spelled
// it, and returns the store's key.
func (s *server) txnKey(spelled string, kvserver bool, where string) (string, error) {
	if !kvserver {
		if err := checkKey(spelled, s.cfg.maxKeyBytes); err != nil {
			return "", fmt.Errorf("invalid transaction: %s: %w", where, err)
		}
		return spelled, nil
	}
	key, _, err := checkSpelled(spelled, s.cfg.maxKeyBytes, true)
	if err != nil {
		return "", fmt.Errorf("invalid transaction: %s: %w", where, err)
	}
	return key, nil
}

// jsonProblem is what a JSON decoding error says, without Go's type
// names.
func jsonProblem(err error) string {
	var typeErr *json.UnmarshalTypeError
	if errors.As(err, &typeErr) {
		if typeErr.Field == "" {
			return "not a JSON object"
		}
		return fmt.Sprintf("%q has the wrong type (%s)", typeErr.Field, typeErr.Value)
	}
	return err.Error()
}

// allowTxn returns nil if c may do t: read each checked key, write each
// op's key (SPEC 11). It is decided before any check is evaluated: a
// conflict would show a value the caller may not read.
func (s *server) allowTxn(c caller, r *txnRequest) error {
	for i, ch := range r.t.checks {
		if err := s.access.allow(c, ch.key, permRead); err != nil {
			return fmt.Errorf("check[%d]: %w", i, err)
		}
	}
	for i, o := range r.t.ops {
		if err := s.access.allow(c, o.key, permWrite); err != nil {
			return fmt.Errorf("ops[%d]: %w", i, err)
		}
	}
	return nil
}

// appendTxnDone appends the payload of a committed transaction: {"seq":
// S, "revisions": {key: revision…}}, each op's key as spelled, a delete's
// revision -1.
func appendTxnDone(b []byte, r *txnRequest) []byte {
	b = append(b, `{"seq":`...)
	b = strconv.AppendInt(b, r.t.seq, 10)
	b = append(b, `,"revisions":{`...)
	for i, key := range r.ops {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendKey(b, key)
		b = append(b, ':')
		b = strconv.AppendInt(b, revisionOf(r.t.versions[i]), 10)
	}
	return append(b, "}}"...)
}

// appendConflicts appends the JSON array of a failed transaction's
// failed checks, each {"key", "value", "revision"[, "ttl"]}: the key as
// spelled, at its current version (null and -1 if missing); now is for
// the TTLs.
func appendConflicts(b []byte, r *txnRequest, conflict *conflictError, now int64) []byte {
	b = append(b, '[')
	for i, c := range conflict.conflicts {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendItem(b, item{r.checks[conflict.at[i]], c.entry}, now)
	}
	return append(b, ']')
}

// conflictMessage is the error of a failed transaction.
func conflictMessage(r *txnRequest, conflict *conflictError) string {
	c := conflict.conflicts[0]
	msg := fmt.Sprintf("check failed: %s is at revision %d, not %d", quoteKey(r.checks[conflict.at[0]]), revisionOf(c.entry), r.t.checks[conflict.at[0]].revision)
	if n := len(conflict.conflicts); n > 1 {
		msg += fmt.Sprintf(" (and %d more)", n-1)
	}
	return msg + ": nothing was applied"
}

// handleTxn answers POST /: a transaction (SPEC 11). 200 {"seq",
// "revisions"}; 409 {"error", "conflicts"}; 400, 413, 507, 401, 403 with
// nothing applied.
func (s *server) handleTxn(w http.ResponseWriter, r *http.Request, _ string) outcome {
	o := s.serveTxn(w, r)
	s.metrics.writes[outcomeTable[o].result].Add(1)
	return o
}

func (s *server) serveTxn(w http.ResponseWriter, r *http.Request) outcome {
	body := getBuffer()
	defer putBuffer(body)
	if err := readBody(w, r, body, s.cfg.maxTxnBytes); err != nil {
		return s.serveFailure(w, apiNative, err)
	}
	req, err := s.parseTxn(body.Bytes(), false)
	if err == nil {
		err = s.allowTxn(callerOf(r), req)
	}
	if err == nil {
		err = s.store.Commit(req.t)
	}
	var conflict *conflictError
	switch {
	case errors.As(err, &conflict):
		b := append(appendJSONString([]byte(`{"error":`), conflictMessage(req, conflict)), `,"conflicts":`...)
		b = append(appendConflicts(b, req, conflict, s.store.now()), '}')
		w.Header()["Content-Type"] = hdrJSON
		w.WriteHeader(http.StatusConflict)
		w.Write(b)
		return outcomeConflict
	case err != nil:
		return s.serveFailure(w, apiNative, err)
	}
	w.Header()["Content-Type"] = hdrJSON
	w.Header()["X-Seq"] = []string{strconv.FormatInt(req.t.seq, 10)}
	w.Write(appendTxnDone(nil, req))
	return outcomeOK
}
