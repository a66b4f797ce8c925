//! The deployment files under `deploy/`, loaded by the real broker: each config passes
//! `tokenbroker check-config` with the environment its manifest gives it, the manifests agree
//! with each other (ports, replica counts, the mounted Fauna key and PostgreSQL password, the
//! connection pools against `max_connections`), and `tokenbroker health`, the
//! container health check, answers as the probes expect. The linters (`scripts/lint-deploy`)
//! check the files' shape; these tests check what the broker makes of them.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;
use tokenbroker_tests::{TestBroker, workspace_binary};

/// Reads a YAML file (several documents allowed) as JSON through PyYAML, which
/// scripts/install-tools provides. CloudFormation tags become `{"!Ref": …}`, `{"!Sub": …}`.
const YAML_TO_JSON: &str = r#"
import json, sys, yaml
class Loader(yaml.SafeLoader):
    pass
def tagged(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {"!" + suffix: value}
Loader.add_multi_constructor("!", tagged)
with open(sys.argv[1]) as f:
    print(json.dumps([d for d in yaml.load_all(f, Loader=Loader) if d is not None]))
"#;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn yaml(path: &Path) -> Vec<Value> {
    tokenbroker_tests::require_tool("python3-yaml");
    let output = Command::new("python3")
        .args(["-c", YAML_TO_JSON])
        .arg(path)
        .output()
        .expect("python3 runs (scripts/install-tools)");
    assert!(
        output.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Every document of every `*.yaml` in `dir`.
fn manifests(dir: &str) -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo(dir))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files.iter().flat_map(|file| yaml(file)).collect()
}

#[track_caller]
fn of_kind<'a>(docs: &'a [Value], kinds: &[&str]) -> &'a Value {
    docs.iter()
        .find(|doc| kinds.iter().any(|kind| doc["kind"] == *kind))
        .unwrap_or_else(|| panic!("no {kinds:?}"))
}

/// Runs `tokenbroker --config CONFIG check-config` with only `env` as TOKENBROKER_* variables.
fn check_config(config: &Path, env: &BTreeMap<String, String>) -> Output {
    let mut command = Command::new(workspace_binary("tokenbroker"));
    for (name, _) in std::env::vars() {
        if name.starts_with("TOKENBROKER_") {
            command.env_remove(name);
        }
    }
    command
        .arg("--config")
        .arg(config)
        .arg("check-config")
        .envs(env)
        .output()
        .unwrap()
}

#[track_caller]
fn assert_valid(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn container_env(container: &Value) -> BTreeMap<String, String> {
    container["env"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|var| {
            let value = var["value"].as_str().expect("literal env values");
            (var["name"].as_str().unwrap().to_owned(), value.to_owned())
        })
        .collect()
}

fn toml_file(path: &Path) -> toml::Table {
    std::fs::read_to_string(path).unwrap().parse().unwrap()
}

/// The port of a section's `listen` address (`server`, `http`, `metrics`).
fn listen_port(config: &toml::Table, section: &str) -> String {
    let listen = config[section]["listen"].as_str().unwrap();
    listen.rsplit(':').next().unwrap().to_owned()
}

#[test]
fn docker_config_is_valid_and_refuses_a_second_replica() {
    let config = repo("deploy/docker/tokenbroker.toml");
    let compose = &yaml(&repo("deploy/docker/compose.yaml"))[0];
    let env: BTreeMap<String, String> =
        serde_json::from_value(compose["services"]["broker"]["environment"].clone()).unwrap();
    assert_eq!(env["TOKENBROKER_REPLICAS"], "1");
    assert_valid(&check_config(&config, &env), "compose broker");
    assert_valid(&check_config(&config, &BTreeMap::new()), "image alone");
    // The HTTP listener the image's config enables is published on its port.
    let table = toml_file(&config);
    let http_port = listen_port(&table, "http");
    let published = compose["services"]["broker"]["ports"].as_array().unwrap();
    assert!(
        published
            .iter()
            .any(|p| p.as_str() == Some(format!("127.0.0.1:{http_port}:{http_port}").as_str())),
        "{published:?}"
    );
    let dockerfile = std::fs::read_to_string(repo("deploy/docker/Dockerfile")).unwrap();
    assert!(
        dockerfile
            .lines()
            .any(|l| l.starts_with("EXPOSE") && l.split_whitespace().any(|p| p == http_port)),
        "the image exposes the HTTP port"
    );

    let two = BTreeMap::from([("TOKENBROKER_REPLICAS".to_owned(), "2".to_owned())]);
    let output = check_config(&config, &two);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("store.backend = embedded cannot run with replicas > 1"),
        "{stderr}"
    );

    let dockerfile = std::fs::read_to_string(repo("deploy/docker/Dockerfile")).unwrap();
    assert!(dockerfile.contains(r#"CMD ["/usr/local/bin/tokenbroker", "health""#));
    assert!(dockerfile.contains("COPY deploy/docker/tokenbroker.toml /etc/tokenbroker/"));
}

/// Checks one k8s setup: its ConfigMap loads with its workload's env, on the port the probes
/// and the Service use, with as many replicas as the env declares. Returns the workload and
/// its env.
fn check_k8s(dir: &str, extra_env: &[(&str, &str)]) -> (Value, BTreeMap<String, String>) {
    let docs = manifests(dir);
    let workload = of_kind(&docs, &["Deployment", "StatefulSet"]).clone();
    let pod = &workload["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let mut env = container_env(container);
    assert_eq!(
        env["TOKENBROKER_CONFIG"],
        "/etc/tokenbroker/tokenbroker.toml"
    );

    let config_text = of_kind(&docs, &["ConfigMap"])["data"]["tokenbroker.toml"]
        .as_str()
        .unwrap()
        .to_owned();
    let config: toml::Table = config_text.parse().unwrap();
    let listen = config["server"]["listen"].as_str().unwrap();
    let port = container["ports"][0]["containerPort"].as_u64().unwrap();
    assert_eq!(listen, format!("0.0.0.0:{port}"), "{dir}");
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(container[probe]["grpc"]["port"], port, "{dir} {probe}");
    }
    let service = of_kind(&docs, &["Service"]);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "grpc");
    assert_eq!(container["ports"][0]["name"], "grpc");
    // Metrics: the configured listener is the pod's `metrics` port, the Service's, and the
    // one the scrape annotations name.
    let metrics_port = container["ports"][1]["containerPort"].as_u64().unwrap();
    assert_eq!(container["ports"][1]["name"], "metrics", "{dir}");
    assert_eq!(
        config["metrics"]["listen"].as_str().unwrap(),
        format!("0.0.0.0:{metrics_port}"),
        "{dir}"
    );
    assert_eq!(
        service["spec"]["ports"][2]["targetPort"], "metrics",
        "{dir}"
    );
    // HTTP: the configured listener is the pod's `http` port and the Service's.
    let http_port = container["ports"][2]["containerPort"].as_u64().unwrap();
    assert_eq!(container["ports"][2]["name"], "http", "{dir}");
    assert_eq!(
        config["http"]["listen"].as_str().unwrap(),
        format!("0.0.0.0:{http_port}"),
        "{dir}"
    );
    assert_eq!(service["spec"]["ports"][1]["targetPort"], "http", "{dir}");
    assert_eq!(service["spec"]["ports"][1]["port"], http_port, "{dir}");
    let annotations = &workload["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], metrics_port.to_string());
    assert_eq!(annotations["prometheus.io/scrape"], "true");

    let dir_path = tempfile::tempdir().unwrap();
    let config_file = dir_path.path().join("tokenbroker.toml");
    std::fs::write(&config_file, &config_text).unwrap();
    env.remove("TOKENBROKER_CONFIG");
    for (name, value) in extra_env {
        env.insert((*name).to_owned(), (*value).to_owned());
    }
    assert_valid(&check_config(&config_file, &env), dir);
    (workload, env)
}

/// The broker's settings in a setup's ConfigMap.
fn configmap_toml(docs: &[Value]) -> toml::Table {
    of_kind(docs, &["ConfigMap"])["data"]["tokenbroker.toml"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn fauna_manifests_load_and_declare_the_autoscalers_maximum() {
    let docs = manifests("deploy/k8s/fauna");
    let pod = &of_kind(&docs, &["Deployment"])["spec"]["template"]["spec"];
    let config = configmap_toml(&docs);
    assert_eq!(config["store"]["backend"].as_str(), Some("fauna"));

    // The key file named in the config is where the Secret is mounted.
    let secret_file = config["store"]["fauna"]["secret_file"].as_str().unwrap();
    let secret = of_kind(&docs, &["Secret"]);
    assert_eq!(secret_file, mounted_secret(pod, secret, "server-key"));
    // The replicas share idempotent replays and rotations, sealed with a key from the same
    // Secret.
    assert_eq!(
        config["tokens"]["replay_key_file"].as_str().unwrap(),
        mounted_secret(pod, secret, "replay-key")
    );

    // That path does not exist here: point the override at a real file instead.
    let key = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key.path(), "fnAserverkeyfortests").unwrap();
    let key_path = key.path().to_str().unwrap();
    let (workload, env) = check_k8s(
        "deploy/k8s/fauna",
        &[("TOKENBROKER_STORE__FAUNA__SECRET_FILE", key_path)],
    );

    check_autoscaled(&docs, &workload, &env);
}

/// Where `pod` mounts the item `key` of `secret` (a Secret manifest): the file a setting names.
#[track_caller]
fn mounted_secret(pod: &Value, secret: &Value, key: &str) -> String {
    assert!(
        secret["stringData"][key].is_string(),
        "{key} in {}",
        secret["metadata"]["name"]
    );
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["secret"]["secretName"] == secret["metadata"]["name"])
        .unwrap_or_else(|| panic!("the Secret {} is a volume", secret["metadata"]["name"]));
    let item = volume["secret"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|item| item["key"] == key)
        .unwrap_or_else(|| panic!("{key} is projected"));
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("and it is mounted");
    format!(
        "{}/{}",
        mount["mountPath"].as_str().unwrap(),
        item["path"].as_str().unwrap()
    )
}

/// A shared-store setup: at least two replicas, an autoscaler on the workload whose maximum is
/// the declared TOKENBROKER_REPLICAS, and a disruption budget. Returns the autoscaler.
#[track_caller]
fn check_autoscaled<'a>(
    docs: &'a [Value],
    workload: &Value,
    env: &BTreeMap<String, String>,
) -> &'a Value {
    let declared: u64 = env["TOKENBROKER_REPLICAS"].parse().unwrap();
    let hpa = of_kind(docs, &["HorizontalPodAutoscaler"]);
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        workload["metadata"]["name"]
    );
    assert_eq!(
        hpa["spec"]["maxReplicas"], declared,
        "TOKENBROKER_REPLICAS = maxReplicas"
    );
    let replicas = workload["spec"]["replicas"].as_u64().unwrap();
    assert!((2..=declared).contains(&replicas), "{replicas} replicas");
    assert!(hpa["spec"]["minReplicas"].as_u64().unwrap() >= 2);
    let pdb = of_kind(docs, &["PodDisruptionBudget"]);
    assert_eq!(
        pdb["spec"]["selector"], workload["spec"]["selector"],
        "the budget covers the workload's pods"
    );
    hpa
}

/// PostgreSQL's defaults: `max_connections`, and how many of them only superusers may use
/// (`superuser_reserved_connections`).
const PG_MAX_CONNECTIONS: u64 = 100;
const PG_SUPERUSER_RESERVED: u64 = 3;
/// Connections left for administrators, migrations by hand and monitoring
/// (docs/deployment.md, "Sizing the connection pool").
const PG_HEADROOM: u64 = 10;

#[test]
fn postgres_manifests_take_the_password_from_the_secret_and_fit_max_connections() {
    let docs = manifests("deploy/k8s/postgres");
    let workload = of_kind(&docs, &["Deployment"]);
    let pod = &workload["spec"]["template"]["spec"];
    let config = configmap_toml(&docs);
    assert_eq!(config["store"]["backend"].as_str(), Some("postgres"));
    let postgres = &config["store"]["postgres"];

    // The password only from its Secret, as a file; no Secret holds a real value.
    let secrets: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Secret").collect();
    let secret = |name: &str| {
        *secrets
            .iter()
            .find(|s| s["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("a Secret {name}"))
    };
    assert!(
        postgres.get("password").is_none(),
        "no password in the ConfigMap"
    );
    assert_eq!(
        postgres["password_file"].as_str().unwrap(),
        mounted_secret(pod, secret("tokenbroker-postgres"), "password")
    );
    // The replicas share idempotent replays, sealed with a key from the same Secret.
    assert_eq!(
        config["tokens"]["replay_key_file"].as_str().unwrap(),
        mounted_secret(pod, secret("tokenbroker-postgres"), "replay-key")
    );
    // TLS with the server's certificate checked, against the CA from its Secret.
    assert_eq!(postgres["sslmode"].as_str(), Some("verify-full"));
    assert_eq!(
        postgres["ca_file"].as_str().unwrap(),
        mounted_secret(pod, secret("tokenbroker-postgres-ca"), "ca.crt")
    );
    for secret in &secrets {
        for (key, value) in secret["stringData"].as_object().unwrap() {
            assert!(
                value.as_str().unwrap().starts_with("REPLACE-"),
                "{key}: a placeholder, not a value"
            );
        }
    }

    let manifest_env = container_env(&pod["containers"][0]);
    assert!(
        !manifest_env.keys().any(|name| name.contains("PASSWORD")),
        "no password in the environment: {manifest_env:?}"
    );

    // The mounted file does not exist here: point the setting at a real one instead.
    let password = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(password.path(), "a-password-for-tests").unwrap();
    let (workload, env) = check_k8s(
        "deploy/k8s/postgres",
        &[(
            "TOKENBROKER_STORE__POSTGRES__PASSWORD_FILE",
            password.path().to_str().unwrap(),
        )],
    );
    let hpa = check_autoscaled(&docs, &workload, &env);

    // The most pods at once (the autoscaler's maximum and the rollout's surge) with full
    // pools, plus headroom, fit a default server.
    let surge = workload["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
        .as_u64()
        .expect("maxSurge as a count");
    let pods = hpa["spec"]["maxReplicas"].as_u64().unwrap() + surge;
    let pool_size = postgres["pool_size"].as_integer().unwrap().unsigned_abs();
    assert!(
        pods * pool_size + PG_HEADROOM <= PG_MAX_CONNECTIONS - PG_SUPERUSER_RESERVED,
        "{pods} pods x pool_size {pool_size} + {PG_HEADROOM} > max_connections"
    );
}

#[test]
fn postgres_compose_starts_the_broker_on_a_healthy_database() {
    let compose = &yaml(&repo("deploy/docker/compose.postgres.yaml"))[0];
    let services = &compose["services"];
    let (broker, postgres) = (&services["broker"], &services["postgres"]);

    assert_eq!(postgres["image"], "postgres:15");
    assert!(postgres["healthcheck"]["test"].is_array());
    assert_eq!(
        broker["depends_on"]["postgres"]["condition"],
        "service_healthy"
    );
    let data = postgres["volumes"][0].as_str().unwrap();
    let (volume, target) = data.split_once(':').unwrap();
    assert_eq!(target, "/var/lib/postgresql/data");
    assert!(
        compose["volumes"].get(volume).is_some(),
        "{volume} is a named volume"
    );

    // The broker's config is the one mounted, and names the service, its role and database.
    let config_path = repo("deploy/docker/tokenbroker-postgres.toml");
    assert!(
        broker["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "./tokenbroker-postgres.toml:/etc/tokenbroker/tokenbroker.toml:ro")
    );
    let config = toml_file(&config_path);
    let settings = &config["store"]["postgres"];
    let db_env = &postgres["environment"];
    assert_eq!(config["store"]["backend"].as_str(), Some("postgres"));
    assert_eq!(settings["host"].as_str(), Some("postgres"));
    assert_eq!(settings["port"].as_integer(), Some(5432));
    assert_eq!(settings["user"].as_str(), db_env["POSTGRES_USER"].as_str());
    assert_eq!(settings["dbname"].as_str(), db_env["POSTGRES_DB"].as_str());

    // One password, from one compose secret given to both services as a file.
    assert!(settings.get("password").is_none());
    let secret = compose["secrets"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap();
    assert_eq!(broker["secrets"][0], *secret);
    assert_eq!(postgres["secrets"][0], *secret);
    let file = format!("/run/secrets/{secret}");
    assert_eq!(settings["password_file"].as_str(), Some(file.as_str()));
    assert_eq!(db_env["POSTGRES_PASSWORD_FILE"], file);

    // Every listener the config enables is published on loopback.
    let published = broker["ports"].as_array().unwrap();
    for section in ["server", "http", "metrics"] {
        let port = listen_port(&config, section);
        assert!(
            published
                .iter()
                .any(|p| p.as_str() == Some(format!("127.0.0.1:{port}:{port}").as_str())),
            "{section} {published:?}"
        );
    }

    let mut env: BTreeMap<String, String> =
        serde_json::from_value(broker["environment"].clone()).unwrap();
    assert!(!env.keys().any(|name| name.contains("PASSWORD")), "{env:?}");
    let password = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(password.path(), "a-password-for-tests").unwrap();
    env.insert(
        "TOKENBROKER_STORE__POSTGRES__PASSWORD_FILE".into(),
        password.path().to_str().unwrap().into(),
    );
    assert_valid(
        &check_config(&config_path, &env),
        "compose broker on postgres",
    );
    // A shared store: the broker accepts being one of several.
    env.insert("TOKENBROKER_REPLICAS".into(), "3".into());
    assert_valid(
        &check_config(&config_path, &env),
        "three brokers on postgres",
    );
}

#[test]
fn embedded_manifests_run_exactly_one_replica() {
    let (workload, env) = check_k8s("deploy/k8s/embedded", &[]);
    assert_eq!(workload["kind"], "StatefulSet");
    assert_eq!(workload["spec"]["replicas"], 1);
    assert_eq!(env["TOKENBROKER_REPLICAS"], "1");
    let docs = manifests("deploy/k8s/embedded");
    assert!(
        !docs.iter().any(|d| d["kind"] == "HorizontalPodAutoscaler"),
        "nothing may scale the embedded store out"
    );
}

/// Resolves a CloudFormation value (`!Ref`, `!Sub` or a literal) with sample parameters.
fn resolve(value: &Value, params: &BTreeMap<&str, &str>) -> String {
    if let Some(text) = value.as_str() {
        return text.to_owned();
    }
    if let Some(name) = value["!Ref"].as_str() {
        return params
            .get(name)
            .unwrap_or_else(|| panic!("no sample for {name}"))
            .to_string();
    }
    let mut text = value["!Sub"]
        .as_str()
        .expect("Ref, Sub or a string")
        .to_owned();
    while let Some(start) = text.find("${") {
        let end = start + text[start..].find('}').unwrap();
        let name = &text[start + 2..end];
        let sample = params
            .get(name)
            .unwrap_or_else(|| panic!("no sample for {name}"));
        text.replace_range(start..=end, sample);
    }
    text
}

#[test]
fn ecs_task_environment_loads_on_the_image_config() {
    let template = &yaml(&repo("deploy/aws/template.yaml"))[0];
    let task = &template["Resources"]["BrokerTaskDefinition"]["Properties"];
    let container = &task["ContainerDefinitions"][0];
    let digest = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881";
    let api_keys =
        format!(r#"[{{ name = "cognito-trigger", roles = ["trigger"], sha256 = "{digest}" }}]"#);
    let params = BTreeMap::from([
        ("FaunaEndpoint", "http://faunadb.internal:8443"),
        ("BrokerApiKeys", api_keys.as_str()),
        ("MaxCount", "6"),
        ("AWS::Region", "us-east-1"),
        ("UserPool", "us-east-1_AbC123xyZ"),
        ("UserPoolClient", "5g2lhd0cexample0client0aa"),
    ]);
    let mut env: BTreeMap<String, String> = container["Environment"]
        .as_array()
        .unwrap()
        .iter()
        .map(|var| {
            (
                var["Name"].as_str().unwrap().to_owned(),
                resolve(&var["Value"], &params),
            )
        })
        .collect();
    for secret in container["Secrets"].as_array().unwrap() {
        env.insert(
            secret["Name"].as_str().unwrap().to_owned(),
            "fnAserverkeyfortests".into(),
        );
    }
    assert_eq!(env["TOKENBROKER_STORE__BACKEND"], "fauna");
    assert_eq!(env["TOKENBROKER_REPLICAS"], "6");
    assert!(env.contains_key("TOKENBROKER_STORE__FAUNA__SECRET"));
    // The container runs the image, whose config is deploy/docker/tokenbroker.toml.
    assert_valid(
        &check_config(&repo("deploy/docker/tokenbroker.toml"), &env),
        "ECS task",
    );
    assert_eq!(container["PortMappings"][0]["ContainerPort"], 50051);
    assert_eq!(container["HealthCheck"]["Command"][2], "health");
}

#[tokio::test]
async fn tokenbroker_health_exits_0_when_serving_and_1_otherwise() {
    let broker = TestBroker::spawn().await;
    let addr = broker.addr.to_string();
    let health = |args: Vec<String>| async move {
        tokio::process::Command::new(workspace_binary("tokenbroker"))
            .arg("health")
            .args(args)
            .output()
            .await
            .unwrap()
    };
    for service in ["", "tokenbroker.v1.TokenBroker"] {
        let out = health(vec![
            "--addr".into(),
            addr.clone(),
            "--service".into(),
            service.into(),
        ])
        .await;
        assert!(out.status.success(), "{service:?}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SERVING");
    }
    let out = health(vec![
        "--addr".into(),
        addr.clone(),
        "--service".into(),
        "no.such".into(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    let stopped = TestBroker::spawn().await;
    let gone = stopped.addr.to_string();
    stopped.stop().await.unwrap();
    let out = health(vec![
        "--addr".into(),
        gone,
        "--timeout-ms".into(),
        "1000".into(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach"),
        "{out:?}"
    );
}
