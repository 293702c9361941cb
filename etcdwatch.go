// The etcd watch over the JSON gateway (etcd.go is the client): one
// streaming POST whose request body stays open for more requests and
// whose response is a stream of watch messages.

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// etcdWatchCreate asks for the changes of [Key, RangeEnd) (Key alone
// without RangeEnd) from StartRevision (0: the next change). PrevKV adds
// each key's previous state; ProgressNotify asks for a progress report
// after a quiet while (etcd's --experimental-watch-progress-notify-interval,
// 10 minutes by default).
type etcdWatchCreate struct {
	Key            []byte `json:"key"`
	RangeEnd       []byte `json:"range_end,omitempty"`
	StartRevision  int64  `json:"start_revision,omitempty,string"`
	ProgressNotify bool   `json:"progress_notify,omitempty"`
	PrevKV         bool   `json:"prev_kv,omitempty"`
}

// An etcdEvent is a key's change: Type is "DELETE", or "" for a PUT (the
// default, left out). A delete's KV holds the key and, as ModRevision,
// the delete's revision.
type etcdEvent struct {
	Type   string  `json:"type"`
	KV     etcdKV  `json:"kv"`
	PrevKV *etcdKV `json:"prev_kv"`
}

// An etcdWatchResponse is a message of a watch: the events of one or more
// whole revisions, in order; or, without events, a progress report.
type etcdWatchResponse struct {
	Header          etcdHeader  `json:"header"`
	WatchID         int64       `json:"watch_id,string"`
	Created         bool        `json:"created"`
	Canceled        bool        `json:"canceled"`
	CompactRevision int64       `json:"compact_revision,string"`
	CancelReason    string      `json:"cancel_reason"`
	Events          []etcdEvent `json:"events"`
}

// progress says whether r is a progress report: the answer to a progress
// request (watch id -1), or a progress_notify.
func (r *etcdWatchResponse) progress() bool {
	return len(r.Events) == 0 && !r.Created && !r.Canceled
}

// An etcdWatch is a watch stream: a POST /v3/watch whose body stays open,
// so that progress requests can follow the create request, and whose
// answer is a stream of JSON messages.
//
// Before its answer's headers, etcd's HTTP/1 server (Go's) reads and
// drops up to 256 KiB of the body the gateway has not read yet: a body
// left open gets no answer, and a request sent meanwhile could be
// dropped. So the create request is followed by blanks, which JSON allows
// between values, until the headers come; after them, what is written
// reaches etcd's watch.
type etcdWatch struct {
	header   etcdHeader // of the "created" message: Revision is the store's when the watch began
	endpoint string     // the member it is open on
	stats    *etcdStats // of the client: each message's revision is etcd's
	body     *io.PipeWriter
	resp     *http.Response
	dec      *json.Decoder
	cancel   context.CancelFunc // ends the request
	mu       sync.Mutex         // held while writing body
	fed      chan struct{}      // closed once the blanks are written
	closed   atomic.Bool
	err      error // what ended the stream, for every later next
}

// watch opens a watch on the first member that answers, and returns once
// etcd created it. ctx bounds the opening; the watch lasts until Close,
// an error or the member's end.
func (c *etcdClient) watch(ctx context.Context, create etcdWatchCreate) (*etcdWatch, error) {
	first, err := json.Marshal(struct {
		Create etcdWatchCreate `json:"create_request"`
	}{create})
	if err != nil {
		return nil, err
	}
	var w *etcdWatch
	err = c.retry(ctx, tripWatch, true, func(ctx context.Context, i int) (bool, error) {
		w, err = c.openWatch(ctx, c.endpoints[i], first)
		return true, err
	})
	return w, err
}

// openWatch opens a watch on the member at endpoint and reads its
// "created" message.
func (c *etcdClient) openWatch(ctx context.Context, endpoint string, first []byte) (*etcdWatch, error) {
	stream, cancel := context.WithCancel(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, cancel)
	pr, pw := io.Pipe()
	w := &etcdWatch{endpoint: endpoint, stats: &c.stats, body: pw, cancel: cancel, fed: make(chan struct{})}
	answered := make(chan struct{})
	w.mu.Lock()
	go func() {
		defer close(w.fed)
		defer w.mu.Unlock()
		// first, then blanks until the answer (see etcdWatch): 512 KiB at
		// once, then 16 KiB a millisecond, or a fast link carries
		// megabytes of them before the answer can come back.
		blank := bytes.Repeat([]byte{' '}, 16<<10)
		_, err := pw.Write(first)
		for n := 0; err == nil; n++ {
			pause := time.Duration(0)
			if n >= 32 {
				pause = time.Millisecond
			}
			select {
			case <-answered:
				return
			case <-time.After(pause):
			}
			_, err = pw.Write(blank)
		}
	}()
	var err error
	w.resp, err = c.post(stream, endpoint+"/v3/watch", pr)
	close(answered)
	if err == nil {
		w.dec = json.NewDecoder(w.resp.Body)
		var r *etcdWatchResponse
		if r, err = w.next(); err == nil && !r.Created {
			err = fmt.Errorf("%w: the first message is not \"created\"", errWatchEnded)
		} else if err == nil {
			w.header = r.Header
		}
	}
	if !stop() && err == nil {
		err = ctx.Err()
	}
	if err != nil {
		w.Close()
		return nil, err
	}
	return w, nil
}

// next returns the watch's next message: events or a progress report. An
// error ends the watch: the caller closes it and watches again from the
// revision after the last seen, or for an *etcdCompactedError reads the
// state again. The errors: *etcdCompactedError (errEtcdCompacted);
// *etcdError, what etcd said ("no leader", a cancel and its reason);
// errWatchEnded, the stream ended or broke; errWatchClosed, after Close.
func (w *etcdWatch) next() (*etcdWatchResponse, error) {
	if w.err != nil {
		return nil, w.err
	}
	var msg struct {
		Result *etcdWatchResponse `json:"result"`
		Error  *struct {
			Code    int    `json:"grpc_code"`
			Status  int    `json:"http_code"`
			Message string `json:"message"`
		} `json:"error"`
	}
	err := w.dec.Decode(&msg)
	r := msg.Result
	switch {
	case err != nil && w.closed.Load():
		err = errWatchClosed
	case err != nil:
		err = fmt.Errorf("%w: %w", errWatchEnded, err)
	case msg.Error != nil:
		err = &etcdError{Code: msg.Error.Code, Message: msg.Error.Message, Status: msg.Error.Status}
	case r == nil:
		err = fmt.Errorf("%w: a message without a result", errWatchEnded)
	case r.Canceled && r.CompactRevision != 0:
		err = &etcdCompactedError{Revision: r.CompactRevision}
	case r.Canceled:
		err = &etcdError{Message: "watch canceled: " + r.CancelReason}
	}
	if w.err = err; err != nil {
		return nil, err
	}
	w.stats.saw(r.Header.Revision)
	return r, nil
}

// requestProgress asks for a progress report, which next returns with
// watch id -1 and the store's revision.
//
// Before etcd 3.4.25 and 3.5.8 (etcd-io/etcd#15220) the report does not
// wait for the watch's events: changes up to its revision may still come
// after it. It then says where etcd was, not that the watch has all of
// it. From 3.4.25 to 3.4.30 (#17507) a watch from an old revision that
// got no events yet may get no report at all.
func (w *etcdWatch) requestProgress() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, err := w.body.Write([]byte(`{"progress_request":{}}`)); err != nil {
		if w.closed.Load() {
			return errWatchClosed
		}
		return fmt.Errorf("%w: %w", errWatchEnded, err)
	}
	return nil
}

// Close ends the watch: etcd cancels it when the connection goes. A next
// blocked at the time returns errWatchClosed.
func (w *etcdWatch) Close() error {
	if w.closed.Swap(true) {
		return nil
	}
	w.body.CloseWithError(errWatchClosed)
	w.cancel()
	if w.resp != nil {
		w.resp.Body.Close()
	}
	<-w.fed
	return nil
}
