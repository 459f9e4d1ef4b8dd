{{/*
Names and labels. Every helper here takes the chart's root context (or, from a parent chart,
`index .Subcharts "sprint-sidecar"`, which is the same thing).
*/}}

{{- define "sprint-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sprint-sidecar.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sprint-sidecar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sprint-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sprint-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sprint-sidecar.labels" -}}
helm.sh/chart: {{ include "sprint-sidecar.chart" . }}
{{ include "sprint-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "sprint-sidecar.serviceAccountName" -}}
{{- if .Values.example.serviceAccount.create }}
{{- default (include "sprint-sidecar.fullname" .) .Values.example.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.example.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The ConfigMap that holds sidecar.toml. */}}
{{- define "sprint-sidecar.configMapName" -}}
{{- printf "%s-config" (include "sprint-sidecar.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Where things are mounted inside the sidecar container. */}}
{{- define "sprint-sidecar.configDir" -}}/etc/sprint-sidecar/config{{- end }}
{{- define "sprint-sidecar.configPath" -}}{{ include "sprint-sidecar.configDir" . }}/sidecar.toml{{- end }}
{{- define "sprint-sidecar.relayTokenDir" -}}/etc/sprint-sidecar/relay-token{{- end }}
{{- define "sprint-sidecar.clientTlsDir" -}}/etc/sprint-sidecar/client-tls{{- end }}
{{- define "sprint-sidecar.adminTokenDir" -}}/etc/sprint-sidecar/admin-token{{- end }}
{{- define "sprint-sidecar.caDir" -}}/etc/sprint-sidecar/ca{{- end }}
