//! The drivers a worker runs Machines with, by name. A Machine names its driver in
//! `config.runtime`, recorded at create (the worker's default when it names none), and
//! every lifecycle call on it goes to that driver.

use std::collections::BTreeMap;
use std::sync::Arc;

use berth_runtime::Runtime;

/// The drivers a worker offers and the one a Machine that names none gets.
#[derive(Clone)]
pub struct Drivers {
    default: String,
    default_driver: Arc<dyn Runtime>,
    by_name: BTreeMap<String, Arc<dyn Runtime>>,
}

impl Drivers {
    /// `runtime` under `name`: the driver of every Machine that names none.
    pub fn new(name: &str, runtime: Arc<dyn Runtime>) -> Drivers {
        Drivers {
            default: name.to_owned(),
            default_driver: runtime.clone(),
            by_name: BTreeMap::from([(name.to_owned(), runtime)]),
        }
    }

    /// Offers `runtime` under `name` as well (in place of one of the same name).
    pub fn with(mut self, name: &str, runtime: Arc<dyn Runtime>) -> Drivers {
        if name == self.default {
            self.default_driver = runtime.clone();
        }
        self.by_name.insert(name.to_owned(), runtime);
        self
    }

    /// The driver of Machines that name none.
    pub fn default_name(&self) -> &str {
        &self.default
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Runtime>> {
        self.by_name.get(name)
    }

    /// The default driver, for host work that is the same under every driver (volumes).
    pub fn default_driver(&self) -> &Arc<dyn Runtime> {
        &self.default_driver
    }

    /// The names offered, sorted: what the worker reports to the control plane.
    pub fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }

    pub fn all(&self) -> impl Iterator<Item = (&str, &Arc<dyn Runtime>)> {
        self.by_name
            .iter()
            .map(|(name, driver)| (name.as_str(), driver))
    }
}

/// One driver, under its own name, for every Machine.
impl From<Arc<dyn Runtime>> for Drivers {
    fn from(runtime: Arc<dyn Runtime>) -> Drivers {
        Drivers::new(runtime.name(), runtime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_runtime::fake::FakeRuntime;

    #[test]
    fn names_are_sorted_and_the_default_is_kept() {
        let drivers = Drivers::new("runc", Arc::new(FakeRuntime::new()))
            .with("native", Arc::new(FakeRuntime::new()))
            .with("runc", Arc::new(FakeRuntime::new()));
        assert_eq!(drivers.names(), ["native", "runc"]);
        assert_eq!(drivers.default_name(), "runc");
        assert!(drivers.get("gvisor").is_none());
        let single = Drivers::from(Arc::new(FakeRuntime::new()) as Arc<dyn Runtime>);
        assert_eq!(single.names(), ["fake"]);
    }
}
