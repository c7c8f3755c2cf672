//! What the daemon serves, whatever the transport: the models of a configuration,
//! loaded and checked, each route's annotator and payload format, and one worker
//! pool per model. A transport routes a message to one of these routes, parses it
//! and submits it with its own reply handle; it never touches a model.
//!
//! A reload builds the next service beside the running one ([`reload`], off the
//! transport's loop): models whose files and settings did not change are shared,
//! the others loaded anew; the transport then swaps it in between two messages.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::bundle::Bundle;
use crate::config::Config;
use crate::engine::{Int8Path, KernelChoice, Rewrites};
use crate::error::{Error, Result};
use crate::message::{PayloadFormat, Request};
use crate::pool::{Closed, Health, Job, Pool, Reply};
use crate::tasks::Annotator;

/// A route as a transport serves it.
#[derive(Clone)]
pub struct Route {
    /// The route's key in `[models]`.
    pub model: String,
    pub annotator: Arc<Annotator>,
    pub format: PayloadFormat,
}

/// A model as loaded, with what its files looked like then.
#[derive(Clone)]
pub struct Loaded {
    pub bundle: Arc<Bundle>,
    stamp: Stamp,
}

/// What tells a bundle folder's files apart without reading them: size and
/// modification time of each, the digest the configuration pins, and how its int8
/// weights run (another path is another engine).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    path: PathBuf,
    sha256: Option<String>,
    int8: Int8Path,
    kernel: KernelChoice,
    files: Vec<Option<(u64, SystemTime)>>,
}

/// ` (avx512-vnni ×24)`: which int8 kernel multiplies how many weight matrices, for the load
/// log (the status message carries the same map).
fn kernels_note(kernels: &BTreeMap<String, usize>) -> String {
    if kernels.is_empty() {
        return String::new();
    }
    let list: Vec<String> = kernels.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
    format!(" ({})", list.join(", "))
}

impl Stamp {
    fn of(path: &Path, sha256: Option<&String>, int8: Int8Path, kernel: KernelChoice) -> Stamp {
        let files = ["model.onnx", "tokenizer.json", "config.json"]
            .iter()
            .map(|f| {
                let m = std::fs::metadata(path.join(f)).ok()?;
                Some((m.len(), m.modified().ok()?))
            })
            .collect();
        Stamp {
            path: path.to_path_buf(),
            sha256: sha256.cloned(),
            int8,
            kernel,
            files,
        }
    }
}

/// Every model of a configuration and every route's annotator.
#[derive(Clone)]
pub struct Models {
    pub loaded: BTreeMap<String, Loaded>,
    pub routes: Vec<Route>,
}

impl Models {
    /// Loads every model of `config` and checks every route: what `anotador check
    /// --config` runs. Models of `running` whose folder, pinned digest and files
    /// are unchanged are shared instead of loaded again.
    pub fn load(config: &Config, running: Option<&Models>) -> Result<Models> {
        let mut loaded = BTreeMap::new();
        for (name, m) in &config.models {
            let stamp = Stamp::of(&m.path, m.sha256.as_ref(), m.int8, m.kernel);
            if let Some(same) = running
                .and_then(|r| r.loaded.get(name))
                .filter(|l| l.stamp == stamp)
            {
                loaded.insert(name.clone(), same.clone());
                continue;
            }
            let started = Instant::now();
            if let Some(expected) = &m.sha256 {
                crate::bundle::verify_sha256(&m.path, expected)?;
            }
            let rewrites =
                Rewrites::for_model(m.int8, m.kernel.named()).map_err(crate::Error::Kernel)?;
            let bundle = Arc::new(Bundle::load_with(&m.path, rewrites)?);
            log::info!(
                "model {name}: {} ({}, {} labels) loaded in {:.2} s, int8 path: {}{}",
                m.path.display(),
                bundle.config.task.as_str(),
                bundle.config.labels.len(),
                started.elapsed().as_secs_f64(),
                bundle.engine.info().int8_path,
                kernels_note(&bundle.engine.info().rewrites.int8_kernels)
            );
            loaded.insert(name.clone(), Loaded { bundle, stamp });
        }
        let mut routes = Vec::with_capacity(config.routes.len());
        for (i, route) in config.routes.iter().enumerate() {
            let bundle = &loaded[&route.model].bundle;
            route
                .format
                .check(bundle.config.task)
                .map_err(|e| Error::InvalidRequest(format!("routes[{i}].format: {e}")))?;
            let annotator =
                Annotator::new(bundle.clone(), &config.task_options(route)).map_err(|e| {
                    // Name the key that holds the problem, as for every other
                    // configuration problem: the model's options, or the route's.
                    let model = &config.models[&route.model].options;
                    let key = match Annotator::new(bundle.clone(), model) {
                        Err(_) => format!("models.{}", route.model),
                        Ok(_) => format!("routes[{i}].options"),
                    };
                    Error::InvalidRequest(format!("{key}: {e}"))
                })?;
            routes.push(Route {
                model: route.model.clone(),
                annotator: Arc::new(annotator),
                format: route.format,
            });
        }
        Ok(Models { loaded, routes })
    }
}

/// The models and their worker pools, as one transport serves them.
pub struct Service<R> {
    pub models: Models,
    pools: BTreeMap<String, Pool<R>>,
}

impl<R: Reply> Service<R> {
    /// Starts one pool per model; each holds at most `capacity` jobs.
    pub fn start(
        models: Models,
        config: &Config,
        capacity: usize,
        health: &Arc<Health>,
    ) -> Result<Service<R>> {
        let mut pools = BTreeMap::new();
        for (name, loaded) in &models.loaded {
            let settings = config.models[name].pool();
            let pool = Pool::start(name, loaded.bundle.clone(), settings, capacity, health)?;
            pools.insert(name.clone(), pool);
        }
        Ok(Service { models, pools })
    }

    pub fn routes(&self) -> &[Route] {
        &self.models.routes
    }

    /// Hands a parsed request of route `route` to its model's workers.
    pub fn submit(&self, route: usize, request: Request, reply: R) {
        let route = &self.models.routes[route];
        self.pools[&route.model].submit(Job {
            annotator: route.annotator.clone(),
            request,
            reply,
        });
    }

    /// Swaps in a reloaded service between two messages: its models and routes
    /// from now on, the running pools it kept, new pools for the rest. Returns the
    /// pools it replaced, closed: they answer what they already took, then exit,
    /// and their models are freed with them.
    pub fn replace(&mut self, next: Next<R>) -> Vec<Closed> {
        let mut old = std::mem::take(&mut self.pools);
        for (name, pool) in next.pools {
            let pool = match pool {
                Some(started) => started,
                None => old.remove(&name).expect("a kept pool is running"),
            };
            self.pools.insert(name, pool);
        }
        self.models = next.models;
        old.into_values().map(Pool::close).collect()
    }

    /// Stops every pool: what is queued is dropped unanswered.
    pub fn stop(self) -> Vec<Closed> {
        self.pools.into_values().map(Pool::stop).collect()
    }
}

/// A reloaded configuration, its models and the pools it needs: `None` keeps the
/// running pool of that model (same bundle, same settings).
pub struct Next<R> {
    pub config: Config,
    pub models: Models,
    pools: BTreeMap<String, Option<Pool<R>>>,
}

/// Reads `path` again and builds the next service beside the running one
/// (`running`, `models`): checks everything, loads what changed, starts the pools
/// it needs. Any error leaves the running service untouched. Only `[models]` and
/// `[routes]` can change live: the other sections need a restart.
pub fn reload<R: Reply>(
    path: &Path,
    running: &Config,
    models: &Models,
    health: &Arc<Health>,
) -> std::result::Result<Next<R>, String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    if config.daemon != running.daemon {
        return Err(format!(
            "{}: [daemon] changed; that needs a restart (nothing was reloaded)",
            path.display()
        ));
    }
    if config.broker != running.broker {
        return Err(format!(
            "{}: [broker] changed; that needs a restart (nothing was reloaded)",
            path.display()
        ));
    }
    let next = Models::load(&config, Some(models)).map_err(|e| e.to_string())?;
    let mut pools = BTreeMap::new();
    for (name, loaded) in &next.loaded {
        let settings = config.models[name].pool();
        let same = models.loaded.get(name).is_some_and(|l| {
            Arc::ptr_eq(&l.bundle, &loaded.bundle) && running.models[name].pool() == settings
        });
        let pool = if same {
            None
        } else {
            let pool = Pool::start(
                name,
                loaded.bundle.clone(),
                settings,
                config.daemon.queue,
                health,
            )
            .map_err(|e| format!("models.{name}: {e}"))?;
            Some(pool)
        };
        pools.insert(name.clone(), pool);
    }
    Ok(Next {
        config,
        models: next,
        pools,
    })
}
