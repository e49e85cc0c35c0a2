//! The Service Control Manager side: install (automatic, delayed start; restart on failure),
//! uninstall, start, stop, status, and the service entry point, which runs the agent until the
//! SCM says stop or shutdown and then shuts it down gracefully.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Duration,
};

use tokio_util::sync::CancellationToken;
use windows_service::{
    define_windows_service,
    service::{
        ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept,
        ServiceErrorControl, ServiceExitCode, ServiceFailureActions, ServiceFailureResetPeriod, ServiceInfo,
        ServiceStartType, ServiceState, ServiceStatus, ServiceType,
    },
    service_control_handler::{self, ServiceControlHandlerResult},
    service_dispatcher,
    service_manager::{ServiceManager, ServiceManagerAccess},
};

use super::{
    launch_arguments, log_dir, DESCRIPTION, DISPLAY_NAME, EVENT_SOURCE, FAILURE_RESET, RESTART_DELAYS,
    SERVICE_NAME,
};
use crate::{acl, agent::Agent, config::Config};

/// The config the dispatcher's entry point runs with (set before the dispatcher starts).
static CONFIG: OnceLock<PathBuf> = OnceLock::new();

/// Refuses a program a standard user could replace: the service would run it as LocalSystem.
pub fn check_binary(exe: &Path) -> Result<(), acl::AclError> {
    for (path, kind) in acl::binary_checks(exe) {
        acl::check_private(&path, &acl::read(&path)?, kind, acl::BINARY_FIX)?;
    }
    Ok(())
}

/// Registers the service: starts with Windows (delayed, after the network and Docker Desktop's
/// engine had a chance), restarts on failure, runs as LocalSystem with `config`. The program's
/// path is checked first ([`check_binary`]); the folder is prepared by the caller before anything
/// is copied into it ([`acl::prepare`]).
pub fn install(exe: &Path, config: &Path) -> anyhow::Result<()> {
    check_binary(exe)?;
    let manager = ServiceManager::local_computer(
        None::<&str>,
        ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE,
    )?;
    let info = ServiceInfo {
        name: SERVICE_NAME.into(),
        display_name: DISPLAY_NAME.into(),
        service_type: ServiceType::OWN_PROCESS,
        start_type: ServiceStartType::AutoStart,
        error_control: ServiceErrorControl::Normal,
        executable_path: exe.to_owned(),
        launch_arguments: launch_arguments(config),
        dependencies: vec![],
        account_name: None,
        account_password: None,
    };
    let service = manager.create_service(&info, ServiceAccess::CHANGE_CONFIG | ServiceAccess::START)?;
    service.set_description(DESCRIPTION)?;
    service.set_delayed_auto_start(true)?;
    let actions = RESTART_DELAYS
        .iter()
        .map(|delay| ServiceAction { action_type: ServiceActionType::Restart, delay: *delay })
        .collect();
    service.update_failure_actions(ServiceFailureActions {
        reset_period: ServiceFailureResetPeriod::After(FAILURE_RESET),
        reboot_msg: None,
        command: None,
        actions: Some(actions),
    })?;
    // An exit with an error code counts as a failure too, not only a crash.
    service.set_failure_actions_on_non_crash_failures(true)?;
    if let Err(e) = super::eventlog::register(EVENT_SOURCE, exe) {
        tracing::warn!(error = %e, "cannot register the Event Log source; warnings go to the log file only");
    }
    Ok(())
}

/// Removes the service (stopping it first) and its Event Log source.
pub fn uninstall() -> anyhow::Result<()> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)?;
    let service = manager.open_service(
        SERVICE_NAME,
        ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE,
    )?;
    if service.query_status()?.current_state != ServiceState::Stopped {
        let _ = service.stop();
    }
    service.delete()?;
    let _ = super::eventlog::deregister(EVENT_SOURCE);
    Ok(())
}

pub fn start() -> anyhow::Result<()> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)?;
    let service = manager.open_service(SERVICE_NAME, ServiceAccess::START)?;
    service.start::<&str>(&[])?;
    Ok(())
}

/// Sends the running service the parameter-change control, which makes it reload agent.toml. The
/// binding the agent uses exposes no call for it, so this runs `sc.exe`, which every Windows has.
pub fn reload() -> anyhow::Result<()> {
    let out = std::process::Command::new("sc.exe").args(super::reload_arguments()).output()?;
    anyhow::ensure!(
        out.status.success(),
        "sc.exe control {SERVICE_NAME} paramchange: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    Ok(())
}

pub fn stop() -> anyhow::Result<()> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)?;
    let service = manager.open_service(SERVICE_NAME, ServiceAccess::STOP)?;
    service.stop()?;
    Ok(())
}

/// One line: the service's state as the SCM reports it.
pub fn status() -> anyhow::Result<String> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)?;
    let service =
        manager.open_service(SERVICE_NAME, ServiceAccess::QUERY_STATUS | ServiceAccess::QUERY_CONFIG)?;
    let status = service.query_status()?;
    let config = service.query_config()?;
    Ok(format!(
        "{SERVICE_NAME}: {:?} (start {:?}, {})",
        status.current_state,
        config.start_type,
        config.executable_path.display()
    ))
}

/// The start-time check: the folder, the files in it that decide what the service does or whom
/// it trusts, and the identity files agent.toml names (which may lie elsewhere) are writable by
/// SYSTEM and Administrators only.
pub fn check_data_dir(data_dir: &Path, identity: &[&Path]) -> Result<(), acl::AclError> {
    let fix = acl::start_fix(data_dir);
    let mut checks = acl::start_checks(data_dir);
    for path in identity {
        if !checks.iter().any(|(p, _)| p == path) {
            checks.push((path.to_path_buf(), acl::Kind::File));
        }
    }
    for (path, kind) in checks {
        if kind == acl::Kind::File && !path.exists() {
            continue;
        }
        acl::check_private(&path, &acl::read(&path)?, kind, &fix)?;
    }
    Ok(())
}

define_windows_service!(ffi_service_main, service_main);

/// Hands the process to the Service Control Manager, which calls the entry point below.
pub fn run_dispatcher(config: PathBuf) -> anyhow::Result<()> {
    let _ = CONFIG.set(config);
    service_dispatcher::start(SERVICE_NAME, ffi_service_main)?;
    Ok(())
}

fn service_main(_arguments: Vec<OsString>) {
    if let Err(e) = run_service() {
        tracing::error!(error = %e, "service failed");
    }
}

fn service_status(state: ServiceState, exit: u32, wait: Duration) -> ServiceStatus {
    ServiceStatus {
        service_type: ServiceType::OWN_PROCESS,
        current_state: state,
        controls_accepted: if state == ServiceState::Running {
            ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN | ServiceControlAccept::PARAM_CHANGE
        } else {
            ServiceControlAccept::empty()
        },
        exit_code: ServiceExitCode::Win32(exit),
        checkpoint: 0,
        wait_hint: wait,
        process_id: None,
    }
}

fn run_service() -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let on_control = stop.clone();
    let reload = std::sync::Arc::new(tokio::sync::Notify::new());
    let on_reload = reload.clone();
    let handle = service_control_handler::register(SERVICE_NAME, move |control| match control {
        ServiceControl::Stop | ServiceControl::Shutdown => {
            on_control.cancel();
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::ParamChange => {
            on_reload.notify_one();
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    })?;
    handle.set_service_status(service_status(ServiceState::StartPending, 0, Duration::from_secs(10)))?;
    let config_path = CONFIG.get().cloned().unwrap_or_else(|| super::config_path(&super::data_dir(None)));
    let data_dir = config_path.parent().map(Path::to_owned).unwrap_or_else(|| super::data_dir(None));
    let _logging = logging::init(&log_dir(&data_dir));
    // The service does what its folder's files say, as LocalSystem: refuse to start if anyone but
    // SYSTEM and Administrators can change them.
    let config = Config::load(&config_path);
    let identity: Vec<&Path> = config
        .as_ref()
        .map(|c| vec![c.agent.ca_cert.as_path(), &c.agent.cert, &c.agent.key])
        .unwrap_or_default();
    // ... and the program itself, which could have been made replaceable since it was installed.
    let checked = check_data_dir(&data_dir, &identity).and_then(|()| match std::env::current_exe() {
        Ok(exe) => check_binary(&exe),
        Err(_) => Ok(()),
    });
    if let Err(e) = checked {
        tracing::error!(
            event_id = crate::events::id::FILES_NOT_PRIVATE,
            error = %e,
            "refusing to start: the service's files are not private"
        );
        handle.set_service_status(service_status(ServiceState::Stopped, 1, Duration::ZERO))?;
        return Ok(());
    }
    let outcome = config
        .map_err(anyhow::Error::from)
        .and_then(|config| Agent::new(config).map_err(anyhow::Error::from));
    let agent = match outcome {
        Ok(agent) => agent,
        Err(e) => {
            tracing::error!(event_id = crate::events::id::START_FAILED, error = %e, "cannot start the agent");
            // A non-zero exit: the recovery actions retry (a config fixed meanwhile is picked up).
            handle.set_service_status(service_status(ServiceState::Stopped, 1, Duration::ZERO))?;
            return Ok(());
        }
    };
    handle.set_service_status(service_status(ServiceState::Running, 0, Duration::ZERO))?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let drained = stop.clone();
    runtime.block_on(async move {
        let stopping = drained.clone();
        let tasks = tokio_util::task::TaskTracker::new();
        tasks.spawn(async move {
            stopping.cancelled().await;
            tracing::info!("service stop requested: shutting down");
        });
        let trigger = agent.reload_trigger();
        let relay_reloads = tasks.spawn(async move {
            loop {
                reload.notified().await;
                trigger.notify_one();
            }
        });
        agent.run(drained).await;
        relay_reloads.abort();
        tasks.close();
        tasks.wait().await;
    });
    handle.set_service_status(service_status(ServiceState::Stopped, 0, Duration::ZERO))?;
    Ok(())
}

/// The service's logging: everything to a daily log file under `logs\` (seven kept); to the Event
/// Log (source "Sallyport Agent") every event that carries an `event_id` field, under that ID, and
/// every other warning and error under the general IDs (see [`crate::events`]).
mod logging {
    use std::path::Path;

    use tracing::{field::Visit, Level};
    use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer};

    use super::EVENT_SOURCE;
    use crate::events::{id, severity_of, Severity};
    use crate::service::eventlog;

    pub(super) fn init(dir: &Path) -> Option<()> {
        let appender = tracing_appender::rolling::Builder::new()
            .rotation(tracing_appender::rolling::Rotation::DAILY)
            .filename_prefix("agent")
            .filename_suffix("log")
            .max_log_files(7)
            .build(dir)
            .ok()?;
        let event_log = eventlog::EventLog::open(EVENT_SOURCE).ok().map(EventLog);
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let file = tracing_subscriber::fmt::layer().with_ansi(false).with_target(false).with_writer(appender);
        tracing_subscriber::registry().with(filter).with(file).with(event_log).try_init().ok()
    }

    struct EventLog(eventlog::EventLog);

    impl<S: tracing::Subscriber> Layer<S> for EventLog {
        fn on_event(&self, event: &tracing::Event<'_>, _ctx: tracing_subscriber::layer::Context<'_, S>) {
            let level = *event.metadata().level();
            let mut text = Text::default();
            event.record(&mut text);
            let (id, severity) = match text.event_id.and_then(|n| u16::try_from(n).ok()) {
                Some(n) => (n, severity_of(n).unwrap_or(Severity::Information)),
                None if level == Level::ERROR => (id::ERROR, Severity::Error),
                None if level == Level::WARN => (id::WARNING, Severity::Warning),
                None => return,
            };
            // Nothing to do if the Event Log refuses: the log file has the line.
            let _ = self.0.report(id, severity, &text.text);
        }
    }

    #[derive(Default)]
    struct Text {
        text: String,
        event_id: Option<u64>,
    }

    impl Visit for Text {
        fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
            if field.name() == "event_id" {
                self.event_id = Some(value);
            } else {
                self.record_debug(field, &value);
            }
        }

        fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
            match u64::try_from(value) {
                Ok(v) if field.name() == "event_id" => self.event_id = Some(v),
                _ => self.record_debug(field, &value),
            }
        }

        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            // A message or value may carry what another party sent (a relay's refusal): one line
            // in the Event Log per event, never a forged second one, and bounded.
            let shown = sallyport_runtime::logs::printable(&format!("{value:?}"), 2000);
            if field.name() == "message" {
                self.text.insert_str(0, &shown);
            } else {
                self.text.push_str(&format!(" {}={shown}", field.name()));
            }
        }
    }
}
