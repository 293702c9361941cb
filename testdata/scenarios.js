// runScenarios runs the scenarios of a test page (browser_test.go's
// browse serves this file to every page it opens) one after another, and
// POSTs what each did to /report: [{name, ok, detail?}], in order. A
// scenario that passes may return a string: its detail, which the test
// logs.
'use strict';
async function runScenarios(scenarios) {
    const results = [];
    for (const [name, run] of Object.entries(scenarios)) {
        try {
            const detail = await run();
            results.push(typeof detail === 'string' ? {name, ok: true, detail} : {name, ok: true});
        } catch (e) {
            results.push({name, ok: false, detail: String(e && e.stack || e)});
        }
    }
    await fetch('/report', {method: 'POST', body: JSON.stringify(results)});
}
