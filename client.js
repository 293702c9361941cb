// AtomKV client: shared JSON state with compare-and-swap and live updates.
// Load it with <script src="http://host:port/"></script>; it talks to the
// server it was loaded from (AtomKV.BASE, which a page may change).
'use strict';
var AtomKV = (function () {
    const script = document.currentScript;
    const self = {
        BASE: script && script.src ? new URL(script.src).origin : '',
        // token, if set, goes with every call (Authorization: Bearer) and
        // stream (?token=, all EventSource can send): see -tokens.
        token: '',
    };

    // urlPath spells a key or path for a URL: each component
    // percent-encoded, so that any key (' ', '?', '#', '%' included)
    // reaches the server as it is. A '.' or '..' component is no key, and
    // a browser would resolve it away (even as '%2e') rather than send it:
    // refuse it here, in the server's words.
    function urlPath(path) {
        const parts = path.split('/');
        for (const p of parts) {
            if (p === '.' || p === '..') {
                const what = path.endsWith('/') ? 'path' : 'key';
                throw new Error(`invalid ${what} ${JSON.stringify(path)}: "${p}" component`);
            }
        }
        return parts.map(encodeURIComponent).join('/');
    }

    // request does one HTTP request and rejects with the server's own
    // message on any status it was not told to expect.
    async function request(method, key, {body, headers = {}, ok = []} = {}) {
        const init = {method, headers};
        if (self.token) {
            headers['Authorization'] = 'Bearer ' + self.token;
        }
        if (body !== undefined) {
            init.body = JSON.stringify(body);
            headers['Content-Type'] = 'application/json';
        }
        const resp = await fetch(self.BASE + urlPath(key), init);
        if (resp.ok || ok.includes(resp.status)) {
            return resp;
        }
        let message = `${method} ${key}: HTTP ${resp.status}`;
        try {
            message = (await resp.json()).error || message;
        } catch (_) {
            // not a JSON error body: keep the status line
        }
        throw new Error(message);
    }

    function revision(resp) {
        return Number(resp.headers.get('X-Revision'));
    }

    function writeHeaders(options, rev) {
        const headers = {};
        if (options && options.ttl !== undefined) {
            headers['X-TTL'] = String(options.ttl);
        }
        if (rev !== undefined) {
            headers['X-Revision'] = String(rev);
        }
        return headers;
    }

    /** get(key) → [value, revision], or [null, -1] if the key is missing. */
    self.get = async function (key) {
        const resp = await request('GET', key, {ok: [404]});
        if (resp.status === 404) {
            return [null, -1];
        }
        return [await resp.json(), revision(resp)];
    };

    /** set(key, value, {ttl}?) → the new revision. */
    self.set = async function (key, value, options) {
        const resp = await request('POST', key, {body: value, headers: writeHeaders(options)});
        return revision(resp);
    };

    /**
     * update(key, value, revision, {ttl}?) → true if the key now has the
     * given revision (one more than the one last seen; 0 creates), false
     * if another write came first.
     */
    self.update = async function (key, value, rev, options) {
        const resp = await request('PUT', key, {body: value, headers: writeHeaders(options, rev), ok: [409]});
        return resp.status !== 409;
    };

    /**
     * delete(key, {revision}?) → true; false if a revision was given and
     * the key is not at it.
     */
    self.delete = async function (key, options) {
        const rev = options && options.revision;
        const resp = await request('DELETE', key, {headers: writeHeaders(undefined, rev), ok: [409]});
        return resp.status !== 409;
    };

    /** list(prefix) → [{key, value, revision, ttl?}], sorted by key. */
    self.list = async function (prefix) {
        // GET / alone is this script; Accept asks for the listing instead.
        const path = prefix.endsWith('/') ? prefix : prefix + '/';
        const resp = await request('GET', path, {headers: {Accept: 'application/json'}});
        return resp.json();
    };

    /**
     * subscribe(path, {initial}?) → an async generator of [key, value,
     * revision] for every change of a key, of every key under a prefix
     * ending with '/', or of every key ('/'). A delete or expiry is
     * [key, null, -1]. With {initial: true} it first yields the current
     * state. Events are queued as they arrive, so none is lost while the
     * loop body awaits. EventSource reconnects by itself, with the id of
     * the last event it had (Last-Event-ID), and the server then sends
     * what changed meanwhile, deletes and expiries included; if it cannot
     * (the client was away too long, or the server restarted), it resets
     * the stream and sends the whole state, and this generator yields
     * [key, null, -1] for each key it had reported that the state no
     * longer holds. So the consumer's view of the path is right after any
     * reconnect. Leaving the loop closes the stream.
     */
    self.subscribe = async function* (path, options) {
        const url = new URL(self.BASE + urlPath(path), location.href);
        if (options && options.initial) {
            url.searchParams.set('initial', '1');
        }
        if (self.token) {
            url.searchParams.set('token', self.token);
        }
        const queue = [];
        let head = 0;
        let wake = null;
        let failed = false;
        const notify = () => {
            if (wake) {
                wake();
                wake = null;
            }
        };
        const source = new EventSource(url);
        source.onmessage = (msg) => {
            const [key, rev] = parseID(msg.lastEventId);
            queue.push([key, JSON.parse(msg.data), rev]);
            notify();
        };
        // Named events: they reach no onmessage, so a page that uses
        // EventSource itself sees only changes.
        source.addEventListener('reset', () => {
            queue.push(RESET);
            notify();
        });
        source.addEventListener('synced', () => {
            queue.push(SYNCED);
            notify();
        });
        source.onerror = () => {
            // While CONNECTING, EventSource is retrying by itself; CLOSED
            // means the server refused the stream.
            if (source.readyState === EventSource.CLOSED) {
                failed = true;
                notify();
            }
        };
        const held = new Set(); // keys last yielded with a value
        let fresh = null; // after a reset, until synced: the keys the new state yielded
        try {
            for (;;) {
                while (head < queue.length) {
                    const ev = queue[head];
                    queue[head++] = undefined;
                    if (ev === RESET) {
                        fresh = new Set();
                    } else if (ev === SYNCED) {
                        if (fresh) {
                            for (const key of held) {
                                if (!fresh.has(key)) {
                                    held.delete(key);
                                    yield [key, null, -1];
                                }
                            }
                            fresh = null;
                        }
                    } else {
                        const [key, , rev] = ev;
                        if (fresh) {
                            fresh.add(key);
                        }
                        if (rev === -1) {
                            held.delete(key);
                        } else {
                            held.add(key);
                        }
                        yield ev;
                    }
                }
                queue.length = head = 0;
                if (failed) {
                    throw await streamError(path);
                }
                await new Promise((resolve) => { wake = resolve; });
            }
        } finally {
            source.close();
        }
    };

    // Markers in a subscription's queue for the named events.
    const RESET = {};
    const SYNCED = {};

    // parseID reads an event's id, <key>:<revision>:<seq>: the key has its
    // '%' and ':' written '%25' and '%3A', so the first colon ends it.
    function parseID(id) {
        const [key, rev] = id.split(':');
        return [key.replace(/%3A|%25/g, (m) => (m === '%3A' ? ':' : '%')), Number(rev)];
    }

    // streamError finds out why the server refused a stream: EventSource
    // does not show the answer, so ask the same path as a plain request.
    async function streamError(path) {
        try {
            await request('GET', path, {headers: {Accept: 'application/json'}, ok: [404]});
        } catch (err) {
            return err;
        }
        return new Error(`subscribe ${path}: the server refused the event stream`);
    }

    return self;
})();
