// Runs bench-micro built for wasm32-wasip1 inside V8 (Node's WASI), so the core's logic is
// timed as compiled wasm, as in Envoy's V8 runtime, without Envoy around it:
//
//   cargo build --release --target wasm32-wasip1 -p bench-micro --bin bench-micro
//   node --no-warnings bench/v8run.js target/wasm32-wasip1/release/bench-micro.wasm micro --passes 2
//
// The module also exports the proxy-wasm entry points (session-affinity's glue is compiled
// for every wasm32 build), including `_initialize`, which Node's WASI refuses next to
// `_start`: so start() gets an object with only `_start` and the memory, and the `env`
// host functions are stubs that are never called by the benchmarks.
const fs = require('fs');
const { WASI } = require('node:wasi');
const [wasmPath, ...args] = process.argv.slice(2);
const m = new WebAssembly.Module(fs.readFileSync(wasmPath));
const wasi = new WASI({ version: 'preview1', args: ['bench-micro', ...args], env: {}, preopens: { '/': '/' }, returnOnExit: true });
const env = {};
for (const imp of WebAssembly.Module.imports(m)) if (imp.module === 'env') env[imp.name] = () => 0;
const inst = new WebAssembly.Instance(m, { wasi_snapshot_preview1: wasi.wasiImport, env });
const code = wasi.start({ exports: { memory: inst.exports.memory, _start: inst.exports._start } });
process.exitCode = code;
