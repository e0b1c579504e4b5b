//! `wasm-runner FILE.wasm [ARGS…]`: runs a wasm32-wasip2 command component under wasmtime.
//!
//! Cargo uses it (see `.cargo/config.toml`) to run the guest's unit tests, compiled for
//! `wasm32-wasip2`, under the same engine the host uses. The test binary gets its arguments,
//! stdout/stderr and environment-free WASI with no files; its exit code becomes ours.

use anyhow::Context;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store};
use wasmtime_wasi::p2::bindings::sync::Command;
use wasmtime_wasi::{I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

struct State {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

fn main() {
    match run() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("wasm-runner: {e:#}");
            std::process::exit(101);
        }
    }
}

fn run() -> anyhow::Result<i32> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().context("usage: wasm-runner FILE.wasm [ARGS...]")?;
    let engine = Engine::new(&Config::new()).map_err(anyhow::Error::from)?;
    let component =
        Component::from_file(&engine, path).map_err(anyhow::Error::from).with_context(|| format!("loading {path}"))?;
    let mut linker = Linker::<State>::new(&engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(anyhow::Error::from)?;
    let wasi = WasiCtxBuilder::new().inherit_stdout().inherit_stderr().args(&args).build();
    let mut store = Store::new(&engine, State { wasi, table: ResourceTable::new() });
    let command = Command::instantiate(&mut store, &component, &linker).map_err(anyhow::Error::from)?;
    match command.wasi_cli_run().call_run(&mut store) {
        Ok(Ok(())) => Ok(0),
        Ok(Err(())) => Ok(1),
        Err(e) => match e.downcast_ref::<I32Exit>() {
            Some(exit) => Ok(exit.0),
            None => {
                eprintln!("wasm-runner: the test binary trapped: {e:?}");
                Ok(101)
            }
        },
    }
}
