// AtomKV client: shared JSON state with compare-and-swap and live updates.
// Load it with <script src="http://host:port/"></script>; it talks to the
// server it was loaded from (AtomKV.BASE, which a page may change).
//
// A page holds one WebSocket to its server, opened on first use, and
// carries every subscription and request on it: a browser allows six
// HTTP/1.1 connections per host, shared by every tab, and an EventSource
// per subscription would hold them all. Where the WebSocket cannot open
// (a proxy that refuses the upgrade), the client falls back to
// EventSource and fetch, with the same results. Types: client.d.ts.
'use strict';
var AtomKV = (function () {
    const script = document.currentScript;
    const self = {
        BASE: script && script.src ? new URL(script.src).origin : '',
        // token, if set, goes with every call (Authorization: Bearer) and
        // stream or socket (?token=, all EventSource and WebSocket can
        // send): see -tokens.
        token: '',
        // transport: 'auto' (a WebSocket; EventSource and fetch if two
        // handshakes fail before any succeeded), 'websocket' (never fall
        // back) or 'http' (EventSource and fetch only).
        transport: 'auto',
        // onstatus(status, transport), if set, hears 'connecting', 'open'
        // and 'closed', and which transport ('websocket' or 'http').
        onstatus: null,
    };

    // How long to wait before reconnecting after n failures in a row:
    // exponential from 100 ms, capped at 5 s, each wait jittered to
    // between half and all of it, so that the pages of a restarted server
    // do not all come back at once.
    const retryBase = 100;
    const retryCap = 5000;
    const retryDelay = (n) => Math.min(retryCap, retryBase * 2 ** n) * (0.5 + Math.random() / 2);

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

    // coveringPaths returns the paths whose subscriptions see the changes
    // of key, nearest first: the key itself, then each prefix above it, up
    // to '/' (/a/b/c, /a/b/, /a/, /). It is the server's rule (keys.go,
    // coveringPaths and covers), and TestCoversInJavaScript runs both on
    // one table. A key spelled KvServer's way, without the leading '/',
    // gets its paths spelled alike ('room/a': 'room/a', 'room/', '').
    // It uses nothing else of this file, so that the test can run it alone.
    function coveringPaths(key) {
        const kvserver = key[0] !== '/';
        const name = kvserver ? '/' + key : key;
        const paths = [key];
        for (let i = name.length - 2; i >= 0; i--) {
            if (name[i] === '/') {
                paths.push(name.slice(kvserver ? 1 : 0, i + 1));
            }
        }
        return paths;
    }

    // hub is the connection of the page to one server as one caller:
    // BASE, token and transport decide it, so a page that changes them
    // gets another (and the old one closes once nothing uses it).
    const hubs = new Map();
    function hub() {
        const name = [self.BASE, self.token, self.transport].join(' ');
        let h = hubs.get(name);
        if (!h) {
            h = self.transport === 'http' ? new HTTPHub(self.BASE, self.token) : new SocketHub(self.BASE, self.token, self.transport);
            hubs.set(name, h);
        }
        for (const [other, o] of hubs) {
            if (o !== h && o.idle()) {
                o.close();
                hubs.delete(other);
            }
        }
        return h;
    }

    function status(s, transport) {
        if (typeof self.onstatus === 'function') {
            try {
                self.onstatus(s, transport);
            } catch (err) {
                setTimeout(() => { throw err; }); // the page's bug: report it, keep going
            }
        }
    }

    // The calls are async functions, so that a bad key rejects, as every
    // other failure does, rather than throwing.

    /** get(key) → [value, revision], or [null, -1] if the key is missing. */
    self.get = async (key) => hub().get(key);

    /** set(key, value, {ttl}?) → the new revision. */
    self.set = async (key, value, options) => hub().set(key, value, options);

    /**
     * update(key, value, revision, {ttl}?) → true if the key now has the
     * given revision (one more than the one last seen; 0 creates), false
     * if another write came first.
     */
    self.update = async (key, value, rev, options) => hub().update(key, value, rev, options);

    /**
     * delete(key, {revision}?) → true; false if a revision was given and
     * the key is not at it.
     */
    self.delete = async (key, options) => hub().delete(key, options);

    /**
     * list(prefix, {limit, after, shallow}?) → [{key, value, revision,
     * ttl?}], in key order. With any option it is a page (SPEC 3a): at
     * most limit items, after the key after, and with shallow the direct
     * children only, a deeper prefix as one {prefix} item; the array's
     * next is the after of the next page (null if none follows), and its
     * seq the point of the change sequence the page reflects.
     */
    self.list = async (prefix, options) => hub().list(prefix.endsWith('/') ? prefix : prefix + '/', options);

    /**
     * transaction({check, ops}) → {ok: true, seq, revisions} if every
     * check held and every op was applied as one change; {ok: false,
     * conflicts} if a check failed and nothing was applied (SPEC 11).
     */
    self.transaction = async (txn) => hub().transaction(txnBody(txn));

    /** DELETE, returned by a transact function for a key, deletes it. */
    self.DELETE = Symbol('AtomKV.DELETE');

    /**
     * transact(keys, fn, {retries}?) reads the keys and calls fn with an
     * array of their values (null for a missing key); fn returns an array
     * in keys order, each a value to set, undefined to leave the key as it
     * is, or AtomKV.DELETE, and that is committed with a check on every
     * revision read. On a conflict fn runs again on the new values, after
     * a random pause that grows, at most retries (25) times more. Resolves
     * with the values committed, or undefined if fn returned undefined
     * (nothing written). fn must be pure: it may run several times, and on
     * values read one by one, which a check then refuses if they were
     * never together.
     */
    self.transact = async (keys, fn, options) => {
        const retries = options && options.retries !== undefined ? options.retries : 25;
        if (!Array.isArray(keys) || typeof fn !== 'function') {
            throw new TypeError('transact(keys, fn): want an array of keys and a function');
        }
        const twice = keys.find((key, i) => keys.indexOf(key) !== i);
        if (twice !== undefined) {
            throw new Error(`transact: key ${JSON.stringify(twice)} is twice in keys`);
        }
        const h = hub();
        const read = () => Promise.all(keys.map((key) => h.get(key)));
        // unchanged reads the keys again: if every revision is the one
        // seen, the keys were all at them together, between the two reads.
        const unchanged = async (seen) => (await read()).every(([, rev], i) => rev === seen[i][1]);
        for (let conflicts = 0; ; ) {
            const began = Date.now();
            const seen = await read();
            let out;
            try {
                out = await fn(seen.map(([value]) => value));
            } catch (err) {
                if (await unchanged(seen)) {
                    throw err; // fn's own failure, on values that were together
                }
                out = null; // a view no check would have let through: again
            }
            if (out === undefined) {
                return undefined;
            }
            if (out !== null) {
                if (!Array.isArray(out) || out.length !== keys.length) {
                    throw new TypeError(`transact: fn returned ${Array.isArray(out) ? out.length + ' values' : typeof out}; want an array of ${keys.length} (one per key) or undefined`);
                }
                const check = keys.map((key, i) => ({key, revision: seen[i][1]}));
                const ops = [];
                const values = out.map((v, i) => {
                    if (v === undefined) {
                        return seen[i][0];
                    }
                    if (v === self.DELETE) {
                        ops.push({op: 'delete', key: keys[i]});
                        return null;
                    }
                    ops.push({op: 'set', key: keys[i], value: v});
                    return v;
                });
                // Nothing to write (a transaction needs an op): the values
                // read are committed if they were all current at once.
                if (ops.length ? (await h.transaction({check, ops})).ok : await unchanged(seen)) {
                    return values;
                }
            }
            if (++conflicts > retries) {
                throw new Error(`transact ${keys.join(', ')}: ${conflicts} conflicts in a row (retries: ${retries}): other writes kept changing the keys; nothing was written`);
            }
            // Wait a random moment, up to the attempt's own time, doubled
            // at each conflict in a row: retried at once, the writer
            // whose commit came first reads first again and wins again,
            // and the others of a page never get their turn.
            const took = Math.max(1, Date.now() - began);
            await new Promise((resolve) => setTimeout(resolve, Math.random() * Math.min(retryCap, took * 2 ** Math.min(conflicts - 1, 12))));
        }
    };

    /**
     * subscribe(path, {initial}?) → an async generator of [key, value,
     * revision] for every change of a key, of every key under a prefix
     * ending with '/', or of every key ('/'). A delete or expiry is
     * [key, null, -1]. With {initial: true} it first yields the current
     * state. Events are queued as they arrive, so none is lost while the
     * loop body awaits. After a reconnect the server sends what changed
     * meanwhile, deletes and expiries included; if it cannot (the client
     * was away too long, or the server restarted without -data), it sends
     * the whole state, and this generator yields [key, null, -1] for each
     * key it had reported that the state no longer holds. So the
     * consumer's view of the path is right after any reconnect. Leaving
     * the loop (break, return, throw) ends the subscription.
     */
    self.subscribe = async function* (path, options) {
        urlPath(path); // refuse '.' and '..' as every call does
        const sub = new Subscription(path, Boolean(options && options.initial));
        const h = hub();
        h.attach(sub);
        const held = new Set(); // keys last yielded with a value
        let fresh = null; // after a reset, until synced: the keys the new state yielded
        try {
            for (;;) {
                while (sub.head < sub.queue.length) {
                    const ev = sub.queue[sub.head];
                    sub.queue[sub.head++] = undefined;
                    if (ev === RESET) {
                        fresh = new Set();
                    } else if (ev === SYNCED) {
                        if (fresh) {
                            for (const key of held) {
                                if (!fresh.has(key)) {
                                    held.delete(key);
                                    sub.forget(key);
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
                sub.queue.length = sub.head = 0;
                if (sub.failed) {
                    throw sub.failed;
                }
                await new Promise((resolve) => { sub.wake = resolve; });
            }
        } finally {
            h.detach(sub);
        }
    };

    // Markers in a subscription's queue for the named events.
    const RESET = {};
    const SYNCED = {};

    // Subscription is one subscribe call: the queue its generator drains,
    // fed by the hub's transport.
    class Subscription {
        constructor(path, initial) {
            this.path = path;
            this.initial = initial;
            this.queue = [];
            this.head = 0;
            this.wake = null;
            this.failed = null;
            // What it takes from its channel (see SocketHub.route): the
            // events tagged above floor, the point it is live from, and
            // while a state it is to take is on the way, those tagged tag,
            // as the server tags a state's events (see SocketHub.request);
            // and by key, the last change taken, as [connection, seq,
            // revision], to drop the copy a second channel of the socket
            // carries.
            this.floor = Infinity; // nothing until its channel's ok
            this.tag = null;
            this.channel = null; // of the SocketHub that carries it
            this.last = new Map();
        }
        push(ev) {
            this.queue.push(ev);
            this.notify();
        }
        fail(err) {
            this.failed = err;
            this.notify();
        }
        notify() {
            if (this.wake) {
                this.wake();
                this.wake = null;
            }
        }
        // take queues a change if it is one the subscription is to see
        // (not from before it was live, nor of a state another asked for)
        // and not a copy of one taken already, or older than it, on the
        // same connection. Only where two channels watch the key (shared)
        // does it keep the key's last change, so a subscription costs the
        // page nothing per key otherwise. A key's state is tagged with
        // where the state started, not with its change: it is taken, and
        // the next change is compared with nothing.
        take(conn, key, value, rev, seq, shared) {
            if (seq === this.tag) {
                this.last.delete(key);
            } else if (!(seq > this.floor)) {
                return;
            } else if (shared) {
                const last = this.last.get(key);
                if (last && last[0] === conn && (seq < last[1] || seq === last[1] && rev === last[2])) {
                    return;
                }
                this.last.set(key, [conn, seq, rev]);
            }
            this.push([key, value, rev]);
        }
        forget(key) {
            const last = this.last.get(key);
            if (last) {
                last[2] = -1;
            }
        }
    }

    // bigMessage is the largest request, in bytes, sent on the socket.
    const bigMessage = 60000;

    // outcomeUnknown is how a write in flight when the connection dropped
    // rejects: it was sent, its answer never came, so it may or may not
    // have been applied; the client does not send it again by itself.
    // what names the write: 'set /a', 'transaction of /a, /b'.
    function outcomeUnknown(what, why = 'the connection closed before the answer came') {
        const err = new Error(`${what}: outcome unknown: ${why}; the write may or may not have been applied`);
        err.name = 'OutcomeUnknownError';
        return err;
    }

    // SocketHub carries every subscription and request of the page on one
    // WebSocket, and reconnects it. Each path is subscribed once on the
    // socket (a channel), however many subscriptions of the page watch
    // it; after a reconnect each channel is subscribed again from the
    // last change the connection received (since), so nothing is missed.
    class SocketHub {
        constructor(base, token, transport) {
            this.base = base;
            this.token = token;
            this.fallback = transport === 'auto';
            this.ws = null;
            this.open = false;
            this.retry = null; // the timer of the next attempt
            this.failures = 0; // attempts in a row that did not open
            this.opened = false; // ever
            this.conn = 0; // which connection is open, for Subscription.take
            this.nextID = 1;
            this.calls = new Map(); // by id: a request sent, waiting for its answer
            this.waiting = []; // requests to send once open
            this.channels = new Map(); // by path
            this.seq = null; // where channels resume: the last change the last connection carried
            this.connSeq = 0; // the highest change this connection carried
            this.joined = []; // a transaction's events so far, [key, value, revision], until its last
            this.probing = null; // the key of the probe in flight
            this.http = null; // the fallback, once taken
            this.direct = null; // fetch, for messages too big for the socket
        }

        idle() {
            return this.channels.size === 0 && this.calls.size === 0 && this.waiting.length === 0;
        }

        close() {
            clearTimeout(this.retry);
            this.retry = null;
            if (this.ws) {
                this.ws.onclose = this.ws.onerror = this.ws.onmessage = this.ws.onopen = null;
                this.ws.close();
                this.ws = null;
            }
        }

        connect() {
            if (this.ws || this.retry || this.http) {
                return;
            }
            const url = new URL(this.base + '/', location.href);
            url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
            if (this.token) {
                url.searchParams.set('token', this.token);
            }
            status('connecting', 'websocket');
            const ws = new WebSocket(url);
            this.ws = ws;
            ws.onopen = () => this.opens();
            ws.onmessage = (m) => this.receive(m.data);
            ws.onclose = () => this.closes();
        }

        opens() {
            this.open = true;
            this.opened = true;
            this.failures = 0;
            this.conn++;
            this.connSeq = 0;
            for (const ch of this.channels.values()) {
                for (const sub of ch.subs) {
                    sub.floor = Infinity; // another connection: its own numbers
                    sub.tag = null;
                }
                this.request(ch);
            }
            const waiting = this.waiting;
            this.waiting = [];
            for (const call of waiting) {
                this.send(call);
            }
            status('open', 'websocket');
        }

        closes() {
            const wasOpen = this.open;
            this.ws = null;
            this.open = false;
            this.probing = null;
            this.joined = []; // the resume sends the transaction again, whole
            if (!wasOpen) {
                this.failures++;
            }
            // Reads are asked again on the next connection; a write is
            // not, and says its outcome is unknown.
            for (const call of this.calls.values()) {
                if (call.channel) {
                    continue; // subscribed again on open
                }
                if (call.write) {
                    call.reject(outcomeUnknown(call.what));
                } else {
                    this.waiting.push(call);
                }
            }
            this.calls.clear();
            for (const ch of this.channels.values()) {
                ch.active = ch.registered = false;
                if (ch.state && ch.state.initial) {
                    for (const sub of ch.state.takers) {
                        ch.asking.add(sub); // its state is asked for again
                    }
                }
                ch.state = null;
            }
            status('closed', 'websocket');
            if (this.fallback && !this.opened && this.failures >= 2) {
                this.fallBack();
                return;
            }
            if (this.idle()) {
                return; // nothing to carry: the next use connects
            }
            this.retry = setTimeout(() => {
                this.retry = null;
                this.connect();
            }, retryDelay(this.failures));
        }

        // fallBack moves everything to EventSource and fetch. It happens
        // only before any handshake succeeded, so no subscription has had
        // an event yet, and no request was sent.
        fallBack() {
            this.http = new HTTPHub(this.base, this.token);
            this.http.said = true;
            status('open', 'http');
            for (const ch of this.channels.values()) {
                for (const sub of ch.subs) {
                    this.http.attach(sub);
                }
            }
            this.channels.clear();
            const waiting = this.waiting;
            this.waiting = [];
            for (const call of waiting) {
                this.http[call.method](...call.args).then(call.fulfil, call.reject);
            }
        }

        send(call) {
            if (!this.open) {
                this.waiting.push(call);
                this.connect();
                return;
            }
            const id = this.nextID++;
            this.calls.set(id, call);
            const text = call.text || JSON.stringify(call.msg);
            this.ws.send('{"id":' + id + ',' + text.slice(1));
        }

        // call sends a request and resolves with answer(reply) of its
        // reply; an error reply rejects with the server's message.
        //
        // A message past bigMessage goes by fetch instead: on the socket it
        // would hold up every event and reply behind it, a browser splits
        // it into frames, and one past the server's limit closes the
        // socket (1009) where HTTP answers 413 with the server's message.
        call(method, args, msg, write, answer) {
            if (this.http) {
                return this.http[method](...args);
            }
            const text = JSON.stringify(msg);
            if (text.length > bigMessage / 3 && new TextEncoder().encode(text).length > bigMessage) {
                this.direct = this.direct || new HTTPHub(this.base, this.token);
                return this.direct[method](...args);
            }
            return new Promise((resolve, reject) => {
                this.send({
                    method, args, msg, text, write, what: describe(method, args), reject,
                    fulfil: resolve, // with an answer of the fallback
                    resolve: (reply) => {
                        if (reply.type === 'error') {
                            reject(new Error(reply.payload));
                        } else {
                            resolve(answer(reply));
                        }
                    },
                });
            });
        }

        get(key) {
            urlPath(key);
            return this.call('get', [key], {type: 'get', payload: {key}}, false,
                (r) => (r.type === 'value' ? [r.payload.value, r.payload.revision] : [null, -1]));
        }

        set(key, value, options) {
            urlPath(key);
            const payload = {key, value};
            if (options && options.ttl !== undefined) {
                payload.ttl = options.ttl;
            }
            return this.call('set', [key, value, options], {type: 'set', payload}, true, (r) => r.payload.revision);
        }

        update(key, value, revision, options) {
            urlPath(key);
            const payload = {key, value, revision};
            if (options && options.ttl !== undefined) {
                payload.ttl = options.ttl;
            }
            return this.call('update', [key, value, revision, options], {type: 'update', payload}, true, (r) => r.type === 'ok');
        }

        delete(key, options) {
            urlPath(key);
            const payload = {key};
            if (options && options.revision !== undefined) {
                payload.revision = options.revision;
            }
            return this.call('delete', [key, options], {type: 'delete', payload}, true, (r) => r.type === 'ok');
        }

        list(prefix, options) {
            urlPath(prefix);
            const q = paging(options);
            return this.call('list', [prefix, options], {type: 'list', payload: {prefix, ...q}}, false,
                (r) => (q ? page(r.payload.items, r.payload.seq, r.payload.next) : r.payload));
        }

        transaction(body) {
            return this.call('transaction', [body], {type: 'txn', payload: body}, true,
                (r) => (r.type === 'ok' ? {ok: true, seq: r.payload.seq, revisions: r.payload.revisions} : {ok: false, conflicts: r.payload.conflicts}));
        }

        attach(sub) {
            if (this.http) {
                this.http.attach(sub);
                return;
            }
            let ch = this.channels.get(sub.path);
            if (!ch) {
                ch = {
                    path: sub.path, subs: new Set(), active: false, registered: false,
                    synced: false, asking: new Set(), state: null, owed: null,
                };
                this.channels.set(sub.path, ch);
            }
            ch.subs.add(sub);
            sub.channel = ch;
            if (sub.initial) {
                ch.asking.add(sub);
            } else if (ch.active) {
                sub.floor = this.connSeq; // live from the next change
            } // else its channel's ok sets it
            this.request(ch);
        }

        detach(sub) {
            if (this.http) {
                this.http.detach(sub);
                return;
            }
            const ch = sub.channel;
            if (!ch || !ch.subs.delete(sub) || this.channels.get(ch.path) !== ch) {
                return;
            }
            ch.asking.delete(sub);
            if (ch.state) {
                ch.state.takers.delete(sub);
            }
            if (ch.subs.size) {
                return;
            }
            this.channels.delete(ch.path);
            if (this.open && ch.registered) {
                this.send({msg: {type: 'unsubscribe', payload: {key: ch.path}}, channel: ch, resolve: () => {}});
            }
            // Once every page's use is gone, a socket of a hub the page
            // left (another BASE or token) is closed by hub().
        }

        // request sends what a channel needs next, on an open socket. The
        // socket subscribes each path once, under its own spelling, and
        // asks again under the same spelling for each state it needs; the
        // server keeps the one registration and queues the state, then
        // synced. One state at a time per channel:
        //
        //   - subscriptions that asked for their state (initial): a whole
        //     state, which they take alone, tagged 0;
        //   - else, if the channel has subscriptions that must catch up
        //     from a point (a reconnect, or owed: see below), the state of
        //     what changed after it (since), which they all take, tagged
        //     with that point (or reset, and the whole state);
        //   - else, once per connection, a live subscribe.
        //
        // A state read for some subscriptions stands in for the changes of
        // its keys queued behind it, which the server then drops (they are
        // older or the same); the others never see them. So after a state
        // that some of the channel's subscriptions did not take (a whole
        // one, or a since that one joined during) the channel owes them
        // what changed after its synced, asked next with since: they may
        // see a key's current value again, never miss its last.
        request(ch) {
            if (!this.open) {
                this.connect();
                return;
            }
            if (ch.state) {
                return; // one at a time: the next when it is synced
            }
            const payload = {key: ch.path};
            let state = null;
            const behind = ch.owed !== null ? ch.owed : ch.synced && !ch.registered ? this.seq : null;
            if (ch.asking.size) {
                payload.initial = true;
                state = {initial: true, takers: new Set(ch.asking)};
                ch.asking.clear();
                for (const sub of state.takers) {
                    sub.floor = Infinity;
                    sub.tag = 0;
                }
                if (behind !== null && ch.owed === null && [...ch.subs].some((sub) => !state.takers.has(sub))) {
                    ch.owed = behind; // a reconnect: the others resume after it
                }
            } else if (behind !== null) {
                payload.since = behind;
                state = {initial: false, takers: new Set(ch.subs)};
                for (const sub of ch.subs) {
                    if (!ch.registered) {
                        sub.floor = Infinity; // nothing of this registration came before its state
                    }
                    sub.tag = behind;
                }
            } else if (ch.registered) {
                return; // nothing to ask
            }
            ch.state = state;
            const first = !ch.registered;
            ch.registered = true;
            this.send({
                msg: {type: 'subscribe', payload}, channel: ch,
                resolve: (reply) => {
                    if (this.channels.get(ch.path) !== ch) {
                        return; // left meanwhile: its unsubscribe is on the way
                    }
                    if (reply.type === 'error') {
                        this.channels.delete(ch.path);
                        for (const sub of ch.subs) {
                            sub.fail(new Error(reply.payload));
                        }
                        if (!first) {
                            this.send({msg: {type: 'unsubscribe', payload: {key: ch.path}}, channel: ch, resolve: () => {}});
                        }
                        return;
                    }
                    // The ok comes before every event of the subscribe: a
                    // subscription not yet live, and not waiting for a
                    // state, is live from here.
                    ch.active = true;
                    for (const sub of ch.subs) {
                        if (sub.floor === Infinity && sub.tag === null && !ch.asking.has(sub)) {
                            sub.floor = this.connSeq;
                        }
                    }
                    if (!state && first) {
                        // Live from here: the last change the connection
                        // sees from now on is a resume point of it (one
                        // seen before is too, only older).
                        ch.synced = true;
                        if (this.connSeq === 0) {
                            this.probe(ch.path);
                        }
                    }
                },
            });
        }

        // probe asks for a resume point where the connection has carried
        // none, so that a live subscription on a quiet path misses nothing
        // if the socket drops before any change: the synced of a one-key
        // subscription holds the last change published. The key is under
        // path (what the page may read) and spelled KvServer's way,
        // without the leading '/', so its events reach no channel.
        probe(path) {
            const key = (path.endsWith('/') ? path + '.seq' : path).slice(1);
            if (this.probing || this.channels.has(key)) {
                return; // one at a time; and never on a channel's spelling
            }
            this.probing = key;
            this.send({
                msg: {type: 'subscribe', payload: {key, initial: true}}, channel: true,
                resolve: (reply) => {
                    if (reply.type === 'error') {
                        this.probing = null;
                    }
                },
            });
        }

        receive(data) {
            let msg;
            try {
                msg = JSON.parse(data);
            } catch (_) {
                return; // not ours to read
            }
            if (msg.id === undefined && msg.type === 'error') {
                // A message the server could not read far enough to see
                // its id (one over the size limit): replies come in the
                // order of the requests, so it answers the oldest one.
                msg.id = this.calls.keys().next().value;
            }
            if (msg.id !== undefined) {
                const call = this.calls.get(msg.id);
                if (call) {
                    this.calls.delete(msg.id);
                    call.resolve(msg);
                }
                return;
            }
            const p = msg.payload || {};
            switch (msg.type) {
            case 'value':
            case 'no-value': {
                // A transaction's events come one after another, all but
                // its last on the connection marked more, with no resume
                // point (SPEC 11): they are held, and handed on together
                // with the last, under its seq, the transaction's, so that
                // floors and copies compare its own number and a page sees
                // the transaction whole.
                const ev = [p.key, msg.type === 'value' ? p.value : null, msg.type === 'value' ? p.revision : -1];
                if (p.more === true) {
                    this.joined.push(ev);
                    break;
                }
                const joined = this.joined;
                this.joined = [];
                for (const [key, value, rev] of joined) {
                    this.route(key, value, rev, p.seq);
                }
                this.route(...ev, p.seq);
                break;
            }
            case 'reset': {
                // The state that follows is tagged 0, or the since it
                // could not resume from.
                const ch = this.channels.get(p.key);
                if (ch && ch.active && ch.state) {
                    for (const sub of ch.state.takers) {
                        sub.floor = -1; // until synced, every event is the state's
                        sub.push(RESET);
                    }
                }
                break;
            }
            case 'synced': {
                // Every event of the channel from now on is tagged above
                // seq, and its state covers every change up to it.
                this.saw(p.seq);
                if (p.key === this.probing) {
                    this.probing = null;
                    this.send({msg: {type: 'unsubscribe', payload: {key: p.key}}, channel: true, resolve: () => {}});
                    break;
                }
                const ch = this.channels.get(p.key);
                if (ch && ch.active && ch.state) {
                    const {initial, takers} = ch.state;
                    ch.state = null;
                    ch.synced = true;
                    for (const sub of takers) {
                        sub.floor = sub.floor === Infinity ? p.seq : Math.max(sub.floor, p.seq);
                        sub.tag = null;
                        sub.push(SYNCED);
                    }
                    // The others (live before it, or since it began) may
                    // have lost changes the state stood in for.
                    if (!initial) {
                        ch.owed = null;
                    }
                    if (ch.owed === null && [...ch.subs].some((sub) => !takers.has(sub) && !ch.asking.has(sub))) {
                        ch.owed = p.seq;
                    }
                    this.request(ch);
                }
                break;
            }
            }
        }

        // saw notes the change number a message carried: every message the
        // server sends is a safe resume point for the whole connection
        // (SPEC 4a), so the highest one is where every channel resumes.
        // Only this connection's count: another run of the server numbers
        // its changes afresh, maybe lower.
        saw(seq) {
            if (Number.isSafeInteger(seq) && seq > this.connSeq) {
                this.connSeq = this.seq = seq;
            }
        }

        // route gives a change to every subscription watching its key, as
        // spelled (with or without the leading '/'): the channels of the
        // paths that cover it (coveringPaths). Events do not name their
        // subscription, so where two channels watch a key (/a/ and /a/b/)
        // both copies reach both: each subscription takes the first and
        // drops the other (Subscription.take).
        route(key, value, rev, seq) {
            if (typeof key !== 'string') {
                return;
            }
            this.saw(seq);
            if (key === this.probing) {
                return;
            }
            const watching = [];
            for (const path of coveringPaths(key)) {
                const ch = this.channels.get(path);
                if (ch && ch.active) {
                    watching.push(ch);
                }
            }
            const shared = watching.length > 1;
            const name = key[0] === '/' ? key : '/' + key;
            for (const ch of watching) {
                for (const sub of ch.subs) {
                    sub.take(this.conn, name, value, rev, seq, shared);
                }
            }
        }
    }

    // HTTPHub is the client without the WebSocket: fetch for requests, an
    // EventSource per subscription (what the fallback uses, and
    // transport 'http').
    class HTTPHub {
        constructor(base, token) {
            this.base = base;
            this.token = token;
            this.sources = new Map(); // by subscription
            this.said = false;
        }

        idle() {
            return this.sources.size === 0;
        }

        close() {
            for (const source of this.sources.values()) {
                source.close();
            }
            this.sources.clear();
        }

        // request does one HTTP request and rejects with the server's own
        // message on any status it was not told to expect. A write whose
        // fetch fails (no answer: the network, the server gone) rejects
        // with OutcomeUnknownError, as on the socket.
        async request(method, key, {body, headers = {}, ok = [], query = '', what} = {}) {
            const init = {method, headers};
            if (this.token) {
                headers['Authorization'] = 'Bearer ' + this.token;
            }
            if (body !== undefined) {
                init.body = JSON.stringify(body);
                headers['Content-Type'] = 'application/json';
            }
            const url = this.base + urlPath(key) + query;
            let resp;
            try {
                resp = await fetch(url, init);
            } catch (err) {
                if (method === 'GET') {
                    throw err;
                }
                throw outcomeUnknown(what || `${method} ${key}`, `the request failed before its answer came (${err.message})`);
            }
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

        async get(key) {
            const resp = await this.request('GET', key, {ok: [404]});
            if (resp.status === 404) {
                return [null, -1];
            }
            return [await resp.json(), revision(resp)];
        }

        async set(key, value, options) {
            const resp = await this.request('POST', key, {body: value, headers: writeHeaders(options)});
            return revision(resp);
        }

        async update(key, value, rev, options) {
            const resp = await this.request('PUT', key, {body: value, headers: writeHeaders(options, rev), ok: [409]});
            return resp.status !== 409;
        }

        async delete(key, options) {
            const rev = options && options.revision;
            const resp = await this.request('DELETE', key, {headers: writeHeaders(undefined, rev), ok: [409]});
            return resp.status !== 409;
        }

        async list(prefix, options) {
            // GET / alone is this script; Accept asks for the listing instead.
            const q = paging(options);
            let query = '';
            if (q) {
                const parts = q.shallow ? ['shallow'] : [];
                for (const name of ['limit', 'after']) {
                    if (q[name] !== undefined) {
                        parts.push(name + '=' + encodeURIComponent(q[name]));
                    }
                }
                query = '?' + parts.join('&');
            }
            const resp = await this.request('GET', prefix, {headers: {Accept: 'application/json'}, query});
            const items = await resp.json();
            return q ? page(items, Number(resp.headers.get('X-Seq')), nextAfter(resp.headers.get('Link'))) : items;
        }

        // transaction is POST / (SPEC 11): 409 is a failed check.
        async transaction(body) {
            const resp = await this.request('POST', '/', {body, ok: [409], what: describe('transaction', [body])});
            const answer = await resp.json();
            if (resp.status === 409) {
                return {ok: false, conflicts: answer.conflicts};
            }
            return {ok: true, seq: answer.seq, revisions: answer.revisions};
        }

        // attach opens the subscription's EventSource. It reconnects by
        // itself, with the id of the last event it had (Last-Event-ID),
        // and the server resumes from there, or resets.
        attach(sub) {
            if (!this.said) {
                this.said = true;
                status('open', 'http');
            }
            const url = new URL(this.base + urlPath(sub.path), location.href);
            if (sub.initial) {
                url.searchParams.set('initial', '1');
            }
            if (this.token) {
                url.searchParams.set('token', this.token);
            }
            const source = new EventSource(url);
            this.sources.set(sub, source);
            // A transaction's events but its last carry the stream's last
            // resume point, which they do not move (SPEC 11); so do a
            // state's, until synced. An event tagged no higher than the
            // last one is held, and handed on with the next that is, or
            // with synced, so that the page sees a transaction whole.
            // (Where the stream's opening id or a heartbeat's, which reach
            // no handler, moved the point, the first event of a
            // transaction looks like a change of its own and goes alone.)
            let last = -Infinity;
            let held = [];
            const handOn = () => {
                for (const ev of held) {
                    sub.push(ev);
                }
                held = [];
            };
            source.onmessage = (msg) => {
                const [key, rev, tag] = parseID(msg.lastEventId);
                const ev = [key, JSON.parse(msg.data), rev];
                if (tag <= last) {
                    held.push(ev);
                    return;
                }
                last = tag;
                handOn();
                sub.push(ev);
            };
            // Named events: they reach no onmessage, so a page that uses
            // EventSource itself sees only changes.
            source.addEventListener('reset', (msg) => {
                last = Number(msg.lastEventId);
                held = [];
                sub.push(RESET);
            });
            source.addEventListener('synced', (msg) => {
                last = Number(msg.lastEventId);
                handOn();
                sub.push(SYNCED);
            });
            source.onerror = () => {
                held = []; // the stream resumes from the last id, before them
                // While CONNECTING, EventSource is retrying by itself;
                // CLOSED means the server refused the stream.
                if (source.readyState === EventSource.CLOSED) {
                    this.streamError(sub.path).then((err) => sub.fail(err));
                }
            };
        }

        detach(sub) {
            const source = this.sources.get(sub);
            if (source) {
                source.close();
                this.sources.delete(sub);
            }
        }

        // streamError finds out why the server refused a stream:
        // EventSource does not show the answer, so ask the same path as a
        // plain request (a prefix for one key only: the answer is all
        // that matters).
        async streamError(path) {
            try {
                const one = path.endsWith('/') ? {query: 'limit=1'} : {};
                await this.request('GET', path, {headers: {Accept: 'application/json'}, ok: [404], ...one});
            } catch (err) {
                return err;
            }
            return new Error(`subscribe ${path}: the server refused the event stream`);
        }
    }

    // describe names a request for a message: 'set /a', 'transaction of
    // /a, /b'.
    function describe(method, args) {
        if (method === 'transaction') {
            const ops = Array.isArray(args[0].ops) ? args[0].ops : [];
            return 'transaction of ' + ops.map((op) => op && op.key).join(', ');
        }
        return method + ' ' + args[0];
    }

    // paging is what a list asks besides its prefix (SPEC 3a): those of
    // limit, after and shallow given, or null for none, which lists every
    // key under the prefix as it always did (over the socket, the bare
    // array KvServer's clients expect).
    function paging(options) {
        const {limit, after, shallow} = options || {};
        if (limit == null && after == null && !shallow) {
            return null;
        }
        const q = {};
        if (limit != null) {
            q.limit = limit;
        }
        if (after != null) {
            q.after = after;
        }
        if (shallow) {
            q.shallow = true;
        }
        return q;
    }

    // page is a page of a listing: its items, and on the array, seq and
    // the after of the next page (next, null if none follows).
    function page(items, seq, next) {
        items.seq = seq;
        items.next = next === undefined ? null : next;
        return items;
    }

    // nextAfter reads the after of the next page from a listing's Link
    // header, '<url>; rel="next"' (RFC 8288), or null.
    function nextAfter(link) {
        const m = link && /<([^>]*)>\s*;\s*rel="?next"?/.exec(link);
        return m ? new URL(m[1], 'http://x').searchParams.get('after') : null;
    }

    // txnBody is the body of a transaction, {check?, ops}. Any other
    // member is refused here, as POST / refuses it (a misspelt "checks"
    // must not make a transaction unconditional), whichever way it goes.
    function txnBody(txn) {
        if (txn === null || typeof txn !== 'object' || Array.isArray(txn)) {
            throw new TypeError('invalid transaction: want {check?: [{key, revision}…], ops: [{op, key, value?, ttl?}…]}');
        }
        for (const name of Object.keys(txn)) {
            if (name !== 'check' && name !== 'ops') {
                throw new Error(`invalid transaction: unknown member ${JSON.stringify(name)}: want {check?, ops}`);
            }
        }
        return txn.check === undefined ? {ops: txn.ops} : {check: txn.check, ops: txn.ops};
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

    // parseID reads an event's id, <key>:<revision>:<seq>: the key has its
    // '%' and ':' written '%25' and '%3A', so the first colon ends it.
    function parseID(id) {
        const [key, rev, seq] = id.split(':');
        return [key.replace(/%3A|%25/g, (m) => (m === '%3A' ? ':' : '%')), Number(rev), Number(seq)];
    }

    return self;
})();
