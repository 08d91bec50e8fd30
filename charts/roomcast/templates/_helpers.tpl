{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "roomcast.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, or release-chart. */}}
{{- define "roomcast.fullname" -}}
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

{{- define "roomcast.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "roomcast.labels" -}}
helm.sh/chart: {{ include "roomcast.chart" . }}
{{ include "roomcast.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "roomcast.selectorLabels" -}}
app.kubernetes.io/name: {{ include "roomcast.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The Secret the node's secret variables come from ("" when none). */}}
{{- define "roomcast.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else if or .Values.secrets.jwtHmacSecret .Values.secrets.apiKey }}
{{- include "roomcast.fullname" . }}
{{- end }}
{{- end }}

{{/*
Checks that fail the render with a clear message. Included by the Deployment, so every
render runs them once.
*/}}
{{- define "roomcast.validate" -}}
{{- $broker := trim (toString .Values.broker) }}
{{- $presence := trim (toString (default "" .Values.presence)) }}
{{- if not $broker }}
{{- fail "broker must be set: \"memory\" (a single node), \"redis://host:6379\" or \"nats://host:4222\"" }}
{{- end }}
{{- $replicas := int .Values.replicaCount }}
{{- if eq $broker "memory" }}
{{- if gt $replicas 1 }}
{{- fail (printf "broker \"memory\" keeps rooms, history and presence inside one process: replicaCount must be 1 (got %d). Use a Redis (redis://…) or NATS JetStream (nats://…) broker to run several replicas." $replicas) }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- fail "broker \"memory\" keeps rooms, history and presence inside one process: autoscaling.enabled must be false. Use a Redis (redis://…) or NATS JetStream (nats://…) broker to autoscale." }}
{{- end }}
{{- end }}
{{- if and (eq $presence "memory") (or (gt $replicas 1) .Values.autoscaling.enabled) }}
{{- fail "presence \"memory\" is not shared between nodes: with more than 1 replica, leave presence empty (the broker's) or point it at Redis or NATS." }}
{{- end }}
{{- if and (lt $replicas 1) (not .Values.autoscaling.enabled) }}
{{- fail "replicaCount must be at least 1" }}
{{- end }}
{{- if and .Values.secrets.jwtHmacSecret (lt (len .Values.secrets.jwtHmacSecret) 32) }}
{{- fail "secrets.jwtHmacSecret must be at least 32 bytes (the node refuses a shorter HS256 secret)" }}
{{- end }}
{{- if and .Values.secrets.apiKey (lt (len .Values.secrets.apiKey) 16) }}
{{- fail "secrets.apiKey must be at least 16 characters (the node refuses a shorter API key)" }}
{{- end }}
{{- $grace := int (default 10000 .Values.shutdownGraceMs) }}
{{- $preStop := int .Values.lifecycle.preStopSleepSeconds }}
{{- $needed := add $preStop (div (add $grace 999) 1000) 2 }}
{{- if lt (int .Values.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least lifecycle.preStopSleepSeconds (%d) + shutdownGraceMs/1000 (%d ms) + 2 s = %d, or nodes are killed before their connections are closed" (int .Values.terminationGracePeriodSeconds) $preStop $grace (int $needed)) }}
{{- end }}
{{- end }}
