{{/*
The sidecar as named templates, for the example Deployment and for your own pod specs.
Each takes this chart's context: `.` inside this chart, `(index .Subcharts "sprint-sidecar")`
from a parent chart that depends on it (README.md, "Use it in your own chart").

  sprint-sidecar.container       the container, as one list item ("- name: sprint-sidecar ...");
                                 goes under initContainers (native, the default) or containers
  sprint-sidecar.volumes         its volumes, as list items, for the pod's volumes
  sprint-sidecar.appEnv          RUST_POOL_URL for the app container, as list items for env
  sprint-sidecar.podAnnotations  checksum/config, so that a config change rolls the pods
  sprint-sidecar.config          the rendered sidecar.toml
*/}}

{{- define "sprint-sidecar.image" -}}
{{- $image := .Values.sidecar.image }}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) }}
{{- end }}

{{- define "sprint-sidecar.appEnv" -}}
- name: RUST_POOL_URL
  value: {{ printf "http://127.0.0.1:%d" (int .Values.sidecar.ports.data) | quote }}
{{- end }}

{{- define "sprint-sidecar.podAnnotations" -}}
checksum/config: {{ include "sprint-sidecar.config" . | sha256sum }}
{{- end }}

{{- define "sprint-sidecar.container" -}}
{{- $s := .Values.sidecar }}
{{- $lockAll := $s.config.memory.lock_all }}
{{- if eq (int $s.ports.data) (int $s.ports.admin) }}
{{- fail "sidecar.ports.data and sidecar.ports.admin must be different ports" }}
{{- end -}}
- name: sprint-sidecar
  image: {{ include "sprint-sidecar.image" . | quote }}
  imagePullPolicy: {{ $s.image.pullPolicy }}
  {{- if $s.native }}
  # Native sidecar: starts before the app containers, stops after them.
  restartPolicy: Always
  {{- end }}
  args:
    - run
    - --config
    - {{ include "sprint-sidecar.configPath" . }}
    {{- range $s.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  ports:
    # The admin listener (0.0.0.0): probes, /metrics, the status API. The data listener is
    # bound to 127.0.0.1 and deliberately not declared.
    - name: sidecar-admin
      containerPort: {{ int $s.ports.admin }}
      protocol: TCP
  {{- with $s.env }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  startupProbe:
    httpGet:
      path: /health
      port: {{ int $s.ports.admin }}
    periodSeconds: {{ int $s.probes.startup.periodSeconds }}
    timeoutSeconds: {{ int $s.probes.startup.timeoutSeconds }}
    failureThreshold: {{ int $s.probes.startup.failureThreshold }}
  livenessProbe:
    httpGet:
      path: /health
      port: {{ int $s.ports.admin }}
    periodSeconds: {{ int $s.probes.liveness.periodSeconds }}
    timeoutSeconds: {{ int $s.probes.liveness.timeoutSeconds }}
    failureThreshold: {{ int $s.probes.liveness.failureThreshold }}
  readinessProbe:
    httpGet:
      path: /ready
      port: {{ int $s.ports.admin }}
    periodSeconds: {{ int $s.probes.readiness.periodSeconds }}
    timeoutSeconds: {{ int $s.probes.readiness.timeoutSeconds }}
    failureThreshold: {{ int $s.probes.readiness.failureThreshold }}
  {{- if and (not $s.native) (gt (int $s.classicPreStopSleepSeconds) 0) (semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version) }}
  lifecycle:
    # Classic sidecar: keep serving while the app drains, then SIGTERM starts our own drain.
    preStop:
      sleep:
        seconds: {{ int $s.classicPreStopSleepSeconds }}
  {{- end }}
  {{- with $s.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    runAsNonRoot: true
    runAsUser: {{ int $s.runAsUser }}
    runAsGroup: {{ int $s.runAsGroup }}
    readOnlyRootFilesystem: true
    {{- if $lockAll }}
    # memory.lock_all: the ipc-lock image's file capability cap_ipc_lock=+ep only takes effect
    # at exec when IPC_LOCK is in the bounding set and no_new_privs is off.
    allowPrivilegeEscalation: true
    {{- else }}
    allowPrivilegeEscalation: false
    {{- end }}
    capabilities:
      drop:
        - ALL
      {{- if $lockAll }}
      add:
        - IPC_LOCK
      {{- end }}
    seccompProfile:
      type: RuntimeDefault
  volumeMounts:
    - name: sprint-sidecar-config
      mountPath: {{ include "sprint-sidecar.configDir" . }}
      readOnly: true
    {{- if $s.secrets.relayToken.secretName }}
    - name: sprint-sidecar-relay-token
      mountPath: {{ include "sprint-sidecar.relayTokenDir" . }}
      readOnly: true
    {{- end }}
    {{- if $s.secrets.clientTls.secretName }}
    - name: sprint-sidecar-client-tls
      mountPath: {{ include "sprint-sidecar.clientTlsDir" . }}
      readOnly: true
    {{- end }}
    {{- if $s.secrets.adminToken.secretName }}
    - name: sprint-sidecar-admin-token
      mountPath: {{ include "sprint-sidecar.adminTokenDir" . }}
      readOnly: true
    {{- end }}
    {{- if or $s.ca.configMapName $s.ca.secretName }}
    - name: sprint-sidecar-ca
      mountPath: {{ include "sprint-sidecar.caDir" . }}
      readOnly: true
    {{- end }}
{{- end }}

{{- define "sprint-sidecar.volumes" -}}
{{- $s := .Values.sidecar -}}
- name: sprint-sidecar-config
  configMap:
    name: {{ include "sprint-sidecar.configMapName" . }}
    defaultMode: 292 # 0444: not secret
{{- with $s.secrets.relayToken }}
{{- if .secretName }}
- name: sprint-sidecar-relay-token
  secret:
    secretName: {{ .secretName }}
    defaultMode: 288 # 0440: owner root, group the pod's fsGroup
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- end }}
{{- end }}
{{- with $s.secrets.clientTls }}
{{- if .secretName }}
- name: sprint-sidecar-client-tls
  secret:
    secretName: {{ .secretName }}
    defaultMode: 288 # 0440: owner root, group the pod's fsGroup
    items:
      - key: {{ .certKey }}
        path: {{ .certKey }}
      - key: {{ .keyKey }}
        path: {{ .keyKey }}
{{- end }}
{{- end }}
{{- with $s.secrets.adminToken }}
{{- if .secretName }}
- name: sprint-sidecar-admin-token
  secret:
    secretName: {{ .secretName }}
    defaultMode: 288 # 0440: owner root, group the pod's fsGroup
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- end }}
{{- end }}
{{- with $s.ca }}
{{- if .configMapName }}
- name: sprint-sidecar-ca
  configMap:
    name: {{ .configMapName }}
    defaultMode: 292 # 0444: trust anchors are public
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- else if .secretName }}
- name: sprint-sidecar-ca
  secret:
    secretName: {{ .secretName }}
    defaultMode: 288 # 0440: owner root, group the pod's fsGroup
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- end }}
{{- end }}
{{- end }}

{{/*
sidecar.toml. Sections in SPEC order; within a section the chart-owned keys first, then the
values from .Values.sidecar.config in key order. Values are written with toJson: JSON strings,
numbers, booleans and string arrays are valid TOML.
*/}}
{{- define "sprint-sidecar.config" -}}
{{- $s := .Values.sidecar }}
{{- $secrets := $s.secrets -}}
{{- /* Checks the schema cannot express, here so that the ConfigMap fails too, not only a
       pod spec that includes sprint-sidecar.container. */}}
{{- if eq (int $s.ports.data) (int $s.ports.admin) }}
{{- fail "sidecar.ports.data and sidecar.ports.admin must be different ports" }}
{{- end }}
{{- with $s.config.upstream.auth_token_env }}
{{- $var := . }}
{{- $found := false }}
{{- range $s.env }}{{ if eq .name $var }}{{ $found = true }}{{ end }}{{ end }}
{{- if not $found }}
{{- fail (printf "sidecar.config.upstream.auth_token_env names %s, but sidecar.env sets no variable of that name (add {name: %s, valueFrom: {secretKeyRef: ...}}); the sidecar would refuse to start" $var $var) }}
{{- end }}
{{- end -}}
# sidecar.toml rendered by the sprint-sidecar Helm chart from .Values.sidecar.config.
# Keys commented "chart:" are derived from other values (ports, secrets, ca).
{{- range $section := list "listener" "admin" "upstream" "pool" "breaker" "retry" "memory" "log" "runtime" }}

[{{ $section }}]
{{- if eq $section "listener" }}
# chart: loopback only, so that only this pod's containers can use the relay credential.
address = {{ printf "127.0.0.1:%d" (int $s.ports.data) | toJson }}
{{- else if eq $section "admin" }}
# chart: all interfaces, so that the kubelet's probes and Prometheus reach it.
address = {{ printf "0.0.0.0:%d" (int $s.ports.admin) | toJson }}
{{- if $secrets.adminToken.secretName }}
token_file = {{ printf "%s/%s" (include "sprint-sidecar.adminTokenDir" $) $secrets.adminToken.key | toJson }}
# chart: Secret volume files are root-owned, mode 0440, group = the pod's fsGroup: group read is
# the only way a non-root process reads them, and that group is this pod's own.
allow_insecure_permissions = true
{{- else }}
allow_insecure_permissions = false # chart: no Secret files mounted here
{{- end }}
{{- else if eq $section "upstream" }}
{{- if $secrets.relayToken.secretName }}
auth_token_file = {{ printf "%s/%s" (include "sprint-sidecar.relayTokenDir" $) $secrets.relayToken.key | toJson }}
{{- end }}
{{- if $secrets.clientTls.secretName }}
client_cert_file = {{ printf "%s/%s" (include "sprint-sidecar.clientTlsDir" $) $secrets.clientTls.certKey | toJson }}
client_key_file = {{ printf "%s/%s" (include "sprint-sidecar.clientTlsDir" $) $secrets.clientTls.keyKey | toJson }}
{{- end }}
{{- if or $s.ca.configMapName $s.ca.secretName }}
ca_file = {{ printf "%s/%s" (include "sprint-sidecar.caDir" $) $s.ca.key | toJson }}
{{- end }}
{{- if or $secrets.relayToken.secretName $secrets.clientTls.secretName }}
# chart: Secret volume files are root-owned, mode 0440, group = the pod's fsGroup: group read is
# the only way a non-root process reads them, and that group is this pod's own.
allow_insecure_permissions = true
{{- else }}
allow_insecure_permissions = false # chart: no Secret files mounted here
{{- end }}
{{- end }}
{{- range $key, $value := (index $s.config $section | default dict) }}
{{ $key }} = {{ toJson $value }}
{{- end }}
{{- end }}
{{- end }}
