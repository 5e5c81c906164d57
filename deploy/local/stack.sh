#!/usr/bin/env bash
# Starts, stops and reports the services that sluice's tests use, without
# Docker: a single-node Apache Kafka in KRaft mode (broker and controller in
# one JVM) on 127.0.0.1:9092 and Redis on 127.0.0.1:6379.
#
# Usage: deploy/local/stack.sh up|down|status|reset|run-class CLASS [ARG...]
#
#   up         start both services and wait until they accept requests.
#              A service that already listens on its port is left as it is.
#   down       stop the services this script started with SIGTERM, then
#              SIGKILL after 30 s. Succeeds when nothing is running.
#   status     print one line per service; exit 0 if both are up, 3 otherwise
#   reset      run down, then delete the data folder (topics, offsets, keys)
#   run-class  run a Kafka main class with the stack's classpath, for example
#              run-class org.apache.kafka.tools.TopicCommand \
#                --bootstrap-server 127.0.0.1:9092 --list
#
# Environment:
#   SLUICE_STACK_DIR  folder for the Kafka jars, configs, data and logs
#                     (default: <repo>/.stack, ignored by git)
#   KAFKA_VERSION     Kafka release fetched from Maven Central (default: 4.1.1).
#                     The jars are fetched again when this or
#                     deploy/local/kafka/pom.xml changes.
#   SLUICE_STACK_START_TIMEOUT  seconds that up waits for each service
#                     (default: 90)
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
readonly REPO_DIR
readonly STACK_DIR=${SLUICE_STACK_DIR:-$REPO_DIR/.stack}
readonly KAFKA_VERSION=${KAFKA_VERSION:-4.1.1}
readonly START_TIMEOUT_S=${SLUICE_STACK_START_TIMEOUT:-90}
readonly STOP_TIMEOUT_S=30

readonly POM_FILE=$REPO_DIR/deploy/local/kafka/pom.xml
readonly LIB_DIR=$STACK_DIR/kafka-lib
readonly CONF_DIR=$STACK_DIR/conf
readonly DATA_DIR=$STACK_DIR/data
readonly LOG_DIR=$STACK_DIR/logs
readonly KAFKA_DATA_DIR=$DATA_DIR/kafka
readonly REDIS_DATA_DIR=$DATA_DIR/redis
readonly KAFKA_PID_FILE=$DATA_DIR/kafka.pid
readonly REDIS_PID_FILE=$REDIS_DATA_DIR/redis.pid
readonly KAFKA_LOG_DIR=$LOG_DIR/kafka

readonly HOST=127.0.0.1
readonly KAFKA_PORT=9092
readonly CONTROLLER_PORT=9093
readonly REDIS_PORT=6379

# A fixed cluster id, so a freshly formatted data folder always belongs to the
# same cluster. It is the URL-safe base64 of the 16 bytes "sluice-local-dev".
readonly CLUSTER_ID=c2x1aWNlLWxvY2FsLWRldg

# A small heap suffices for a test broker with few, small topics, and leaves
# memory for the cargo builds that run beside it.
readonly BROKER_JVM_OPTS=(-Xms256m -Xmx768m -XX:+UseG1GC -XX:MaxGCPauseMillis=20
  -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true)
# CLI tools run for a few seconds, so they trade peak speed for a fast start.
readonly TOOL_JVM_OPTS=(-Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1
  -Djava.awt.headless=true)

log() { printf 'stack: %s\n' "$*" >&2; }
die() {
  printf 'stack: error: %s\n' "$*" >&2
  exit 1
}

[[ $START_TIMEOUT_S =~ ^[0-9]+$ ]] ||
  die "SLUICE_STACK_START_TIMEOUT='$START_TIMEOUT_S' is invalid; set it to a whole number of seconds"

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
}

# ---------------------------------------------------------------- processes

port_open() {
  timeout 2 bash -c "</dev/tcp/$HOST/$1" 2>/dev/null
}

# Succeeds while PID exists and has not exited. PID 1 of some containers does
# not reap orphans, so an exited daemon can stay behind as a zombie.
pid_alive() {
  local pid=$1 state
  kill -0 "$pid" 2>/dev/null || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ $state != Z ]]
}

# Prints the pid stored in PID_FILE if that process is alive and its command
# line contains MARKER, so a pid reused by an unrelated process is ignored.
# Removes a stale pid file.
owned_pid() {
  local pid_file=$1 marker=$2 pid
  [[ -f $pid_file ]] || return 0
  pid=$(tr -dc '0-9' <"$pid_file")
  if [[ -n $pid ]] && pid_alive "$pid" &&
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$marker"; then
    echo "$pid"
  else
    rm -f "$pid_file"
  fi
}

# Sends SIGTERM to PID, waits up to STOP_TIMEOUT_S seconds, then SIGKILLs it.
terminate() {
  local name=$1 pid=$2 deadline
  log "$name: stopping pid $pid"
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + STOP_TIMEOUT_S))
  while pid_alive "$pid"; do
    if ((SECONDS >= deadline)); then
      log "$name: pid $pid still running ${STOP_TIMEOUT_S} s after SIGTERM, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 1
      break
    fi
    sleep 0.5
  done
  if pid_alive "$pid"; then
    die "$name: pid $pid did not exit after SIGKILL; check it with 'ps -p $pid'"
  fi
  log "$name: stopped"
}

# Stops the service whose pid file and marker are given. A process on PORT
# that this script did not start is reported and left running.
stop_service() {
  local name=$1 pid_file=$2 marker=$3 port=$4 pid
  pid=$(owned_pid "$pid_file" "$marker")
  if [[ -n $pid ]]; then
    terminate "$name" "$pid"
    rm -f "$pid_file"
  elif port_open "$port"; then
    log "$name: $HOST:$port is served by a process this script did not start; left running"
  else
    log "$name: not running"
  fi
}

print_tail() {
  local file
  for file in "$@"; do
    [[ -s $file ]] || continue
    printf -- '--- last 40 lines of %s ---\n' "$file" >&2
    tail -n 40 "$file" >&2
  done
}

# -------------------------------------------------------------------- java

java_bin() {
  if [[ -n ${JAVA_HOME:-} && -x $JAVA_HOME/bin/java ]]; then
    echo "$JAVA_HOME/bin/java"
  elif command -v java >/dev/null; then
    command -v java
  else
    die "java not found; install Java 17 or newer (apt-get install -y openjdk-17-jdk-headless) or set JAVA_HOME"
  fi
}

# Kafka 4.x brokers require Java 17 or newer.
check_java_version() {
  local java=$1 version major
  version=$("$java" -version 2>&1 | awk -F'"' '/version/ {print $2; exit}')
  major=${version%%.*}
  if [[ $major == 1 ]]; then
    major=$(echo "$version" | cut -d. -f2)
  fi
  if ! [[ $major =~ ^[0-9]+$ ]] || ((major < 17)); then
    die "$java is version '${version:-unknown}' but Kafka $KAFKA_VERSION needs Java 17 or newer; set JAVA_HOME to a newer JDK"
  fi
}

# -------------------------------------------------------------------- kafka

lib_stamp() {
  echo "kafka=$KAFKA_VERSION pom-sha256=$(sha256sum "$POM_FILE" | cut -d' ' -f1)"
}

lib_current() {
  [[ -f $LIB_DIR/.stamp && "$(<"$LIB_DIR/.stamp")" == "$(lib_stamp)" ]]
}

# Copies the jars listed in the pom into LIB_DIR, unless the stamp written by
# the last fetch matches the requested version and pom. The jars land in a
# temporary folder first, so an interrupted fetch never looks complete.
ensure_kafka_lib() {
  lib_current && return 0
  command -v mvn >/dev/null ||
    die "mvn not found, and the Kafka jars are missing from $LIB_DIR; install Maven (apt-get install -y maven)"

  local staging=$LIB_DIR.partial started=$SECONDS
  local mvn_log=$LOG_DIR/maven-fetch.log
  log "kafka: fetching Kafka $KAFKA_VERSION jars from Maven Central into $LIB_DIR"
  rm -rf "$staging"
  mkdir -p "$LOG_DIR"
  # The output goes to a file because Maven 3.8.7 on Debian writes terminal
  # escape codes even in batch mode, and it is only needed when mvn fails.
  if ! mvn -B -q -f "$POM_FILE" -Dkafka.version="$KAFKA_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$staging" >"$mvn_log" 2>&1; then
    rm -rf "$staging"
    print_tail "$mvn_log"
    die "mvn failed to fetch org.apache.kafka:kafka_2.13:$KAFKA_VERSION (log above); check KAFKA_VERSION and the network, then run up again"
  fi
  lib_stamp >"$staging/.stamp"
  rm -rf "$LIB_DIR"
  mv "$staging" "$LIB_DIR"
  log "kafka: fetched $(find "$LIB_DIR" -name '*.jar' | wc -l) jars ($(du -sh "$LIB_DIR" | cut -f1)) in $((SECONDS - started)) s"
}

write_kafka_config() {
  mkdir -p "$CONF_DIR" "$KAFKA_DATA_DIR" "$KAFKA_LOG_DIR"

  cat >"$CONF_DIR/server.properties" <<EOF
# Written by deploy/local/stack.sh on every start, so edit the script instead of this file.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$HOST:$CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$KAFKA_DATA_DIR

# One broker, so every internal topic has a single replica.
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Fewer partitions than the default of 50 mean fewer partition folders to
# create when the first consumer group or transaction starts. These counts
# cannot change once the internal topics exist, so reset the stack after
# editing them.
offsets.topic.num.partitions=4
transaction.state.log.num.partitions=4

# Topics must be created explicitly and can be deleted. Consumer groups start
# without the initial rebalance delay.
auto.create.topics.enable=false
delete.topic.enable=true
group.initial.rebalance.delay.ms=0

# Small segments and size-bound retention keep the data folder small.
log.segment.bytes=8388608
log.retention.bytes=67108864
log.retention.hours=24
log.retention.check.interval.ms=60000
log.cleaner.dedupe.buffer.size=16777216

num.network.threads=2
num.io.threads=4
EOF

  cat >"$CONF_DIR/log4j2-broker.properties" <<EOF
# Written by deploy/local/stack.sh. The broker logs to a size-bounded file.
status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = $KAFKA_LOG_DIR/server.log
appender.file.filePattern = $KAFKA_LOG_DIR/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
EOF

  write_tool_log_config
}

write_tool_log_config() {
  mkdir -p "$CONF_DIR"
  cat >"$CONF_DIR/log4j2-tools.properties" <<EOF
# Written by deploy/local/stack.sh. CLI tools print warnings and errors only.
status = warn
appender.stderr.type = Console
appender.stderr.name = stderr
appender.stderr.target = SYSTEM_ERR
appender.stderr.layout.type = PatternLayout
appender.stderr.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.stderr.ref = stderr
EOF
}

# Runs a Kafka main class with the stack's classpath, bounded by TIMEOUT_S.
kafka_tool() {
  local timeout_s=$1 java
  shift
  java=$(java_bin)
  timeout --kill-after=5 "$timeout_s" "$java" "${TOOL_JVM_OPTS[@]}" \
    -Dlog4j2.configurationFile="$CONF_DIR/log4j2-tools.properties" \
    -cp "$LIB_DIR/*" "$@"
}

# Formats the KRaft metadata log once. When controller.quorum.voters is unset,
# StorageTool 4.1 requires --standalone, --initial-controllers or
# --no-initial-controllers, and --standalone makes this node the only voter.
format_kafka_storage() {
  [[ -f $KAFKA_DATA_DIR/meta.properties ]] && return 0
  log "kafka: formatting $KAFKA_DATA_DIR with cluster id $CLUSTER_ID"
  if ! kafka_tool 120 kafka.tools.StorageTool format --standalone \
    --cluster-id "$CLUSTER_ID" --config "$CONF_DIR/server.properties" >&2; then
    die "formatting the Kafka storage in $KAFKA_DATA_DIR failed (output above); run '$0 reset' to start from an empty data folder"
  fi
}

kafka_ready() {
  port_open "$KAFKA_PORT" &&
    kafka_tool 30 org.apache.kafka.tools.TopicCommand \
      --bootstrap-server "$HOST:$KAFKA_PORT" --list >/dev/null 2>&1
}

start_kafka() {
  local pid java
  pid=$(owned_pid "$KAFKA_PID_FILE" kafka.Kafka)
  if [[ -n $pid ]] || port_open "$KAFKA_PORT"; then
    log "kafka: already listening on $HOST:$KAFKA_PORT${pid:+ (pid $pid)}; left as it is"
    if [[ -n $pid ]] && ! lib_current; then
      log "kafka: the running broker uses other jars than KAFKA_VERSION=$KAFKA_VERSION requests; run down, then up, to switch"
    fi
    return 0
  fi
  if port_open "$CONTROLLER_PORT"; then
    die "port $HOST:$CONTROLLER_PORT (Kafka controller) is in use by another process; stop it ('ss -ltnp' shows which) and run up again"
  fi

  java=$(java_bin)
  check_java_version "$java"
  ensure_kafka_lib
  write_kafka_config
  format_kafka_storage

  log "kafka: starting broker+controller on $HOST:$KAFKA_PORT (controller $HOST:$CONTROLLER_PORT)"
  # setsid detaches the broker from this shell's session and process group,
  # so it outlives the terminal or job that ran up. In a script setsid runs
  # in place without forking, so $! is the JVM's pid.
  nohup setsid "$java" "${BROKER_JVM_OPTS[@]}" \
    -Dlog4j2.configurationFile="$CONF_DIR/log4j2-broker.properties" \
    -Dkafka.logs.dir="$KAFKA_LOG_DIR" \
    -cp "$LIB_DIR/*" kafka.Kafka "$CONF_DIR/server.properties" \
    >>"$LOG_DIR/kafka.out" 2>&1 </dev/null 9>&- &
  pid=$!
  echo "$pid" >"$KAFKA_PID_FILE"

  local deadline=$((SECONDS + START_TIMEOUT_S))
  until kafka_ready; do
    if ! pid_alive "$pid"; then
      print_tail "$KAFKA_LOG_DIR/server.log" "$LOG_DIR/kafka.out"
      rm -f "$KAFKA_PID_FILE"
      die "kafka: broker pid $pid exited during startup (log above); after fixing the cause run up again, or '$0 reset' if the data folder is damaged"
    fi
    if ((SECONDS >= deadline)); then
      print_tail "$KAFKA_LOG_DIR/server.log" "$LOG_DIR/kafka.out"
      terminate kafka "$pid"
      rm -f "$KAFKA_PID_FILE"
      die "kafka: broker pid $pid did not list topics on $HOST:$KAFKA_PORT within $START_TIMEOUT_S s (log above), so it was stopped; raise SLUICE_STACK_START_TIMEOUT on a slow machine"
    fi
    sleep 1
  done
  log "kafka: ready on $HOST:$KAFKA_PORT (pid $pid)"
}

# -------------------------------------------------------------------- redis

# Installs the Debian redis-server package when it is missing and this runs as
# root. The package's maintainer script may start a system-wide Redis on
# 127.0.0.1:6379, which is stopped so that this script owns the port.
ensure_redis_installed() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return 0
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    die "redis-server or redis-cli not found; install them with 'apt-get install -y redis-server redis-tools'"
  fi
  log "redis: installing redis-server and redis-tools with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q redis-server redis-tools >&2
  if command -v service >/dev/null; then
    service redis-server stop >&2 2>/dev/null || true
  fi
}

redis_ready() {
  [[ $(redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
}

start_redis() {
  local pid
  pid=$(owned_pid "$REDIS_PID_FILE" redis-server)
  if [[ -n $pid ]] || port_open "$REDIS_PORT"; then
    log "redis: already listening on $HOST:$REDIS_PORT${pid:+ (pid $pid)}; left as it is"
    return 0
  fi

  ensure_redis_installed
  mkdir -p "$REDIS_DATA_DIR" "$LOG_DIR"
  log "redis: starting on $HOST:$REDIS_PORT"
  # Persistence is off, so test data lives in memory only.
  redis-server --daemonize yes --bind "$HOST" --port "$REDIS_PORT" \
    --save '' --appendonly no --dir "$REDIS_DATA_DIR" \
    --pidfile "$REDIS_PID_FILE" --logfile "$LOG_DIR/redis.log" 9>&- ||
    die "redis-server failed to start; see $LOG_DIR/redis.log"

  local deadline=$((SECONDS + START_TIMEOUT_S))
  until redis_ready; do
    if ((SECONDS >= deadline)); then
      print_tail "$LOG_DIR/redis.log"
      die "redis: no PONG from $HOST:$REDIS_PORT within $START_TIMEOUT_S s (log above)"
    fi
    sleep 0.2
  done
  pid=$(owned_pid "$REDIS_PID_FILE" redis-server)
  log "redis: ready on $HOST:$REDIS_PORT${pid:+ (pid $pid)}"
}

# ------------------------------------------------------------------ commands

# Serializes up, down and reset, so two callers never start a second broker
# on the same data folder. The daemons are started with descriptor 9 closed,
# because a daemon that inherited it would hold the lock until it exits.
take_lock() {
  mkdir -p "$STACK_DIR"
  exec 9>"$STACK_DIR/.lock"
  flock -w 300 9 || die "another stack.sh up/down/reset has held $STACK_DIR/.lock for 300 s; wait for it or remove the lock file"
}

# Prints one status line and succeeds if the service listens on PORT.
service_status() {
  local name=$1 pid_file=$2 marker=$3 port=$4 pid
  pid=$(owned_pid "$pid_file" "$marker")
  if port_open "$port"; then
    printf '%-6s running (pid %s, %s:%s)\n' "$name" "${pid:-unknown, not started by stack.sh}" "$HOST" "$port"
  elif [[ -n $pid ]]; then
    printf '%-6s starting (pid %s, %s:%s not accepting connections yet)\n' "$name" "$pid" "$HOST" "$port"
    return 1
  else
    printf '%-6s stopped\n' "$name"
    return 1
  fi
}

cmd_up() {
  take_lock
  mkdir -p "$DATA_DIR" "$LOG_DIR"
  start_redis
  start_kafka
}

cmd_down() {
  take_lock
  stop_service kafka "$KAFKA_PID_FILE" kafka.Kafka "$KAFKA_PORT"
  stop_service redis "$REDIS_PID_FILE" redis-server "$REDIS_PORT"
}

cmd_status() {
  local code=0
  service_status kafka "$KAFKA_PID_FILE" kafka.Kafka "$KAFKA_PORT" || code=3
  service_status redis "$REDIS_PID_FILE" redis-server "$REDIS_PORT" || code=3
  return "$code"
}

cmd_reset() {
  cmd_down
  log "deleting $DATA_DIR"
  rm -rf "$DATA_DIR"
}

cmd_run_class() {
  [[ $# -ge 1 ]] || die "run-class needs a main class, for example org.apache.kafka.tools.TopicCommand"
  ensure_kafka_lib
  write_tool_log_config
  local java
  java=$(java_bin)
  exec "$java" "${TOOL_JVM_OPTS[@]}" \
    -Dlog4j2.configurationFile="$CONF_DIR/log4j2-tools.properties" \
    -cp "$LIB_DIR/*" "$@"
}

main() {
  local command=${1:-}
  [[ $# -gt 0 ]] && shift
  case $command in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    reset) cmd_reset ;;
    run-class) cmd_run_class "$@" ;;
    -h | --help | help)
      usage
      ;;
    *)
      usage
      die "unknown command '${command}'; expected up, down, status, reset or run-class"
      ;;
  esac
}

main "$@"
