{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "tally.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: RELEASE-tally, or RELEASE alone when it already contains the chart name. */}}
{{- define "tally.fullname" -}}
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

{{/* Name of a companion resource: FULLNAME-SUFFIX, within 63 characters. */}}
{{- define "tally.suffixed" -}}
{{- $full := include "tally.fullname" .root }}
{{- printf "%s-%s" ($full | trunc (int (sub 62 (len .suffix))) | trimSuffix "-") .suffix }}
{{- end }}

{{- define "tally.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "tally.labels" -}}
helm.sh/chart: {{ include "tally.chart" . }}
app.kubernetes.io/name: {{ include "tally.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tally
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector of the server pods (the migration Job's pods have component=migrate). */}}
{{- define "tally.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tally.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{- define "tally.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tally.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest is given. */}}
{{- define "tally.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* The Secret holding TALLY_DATABASE_URL (and TALLY_AUTH_TOKENS). */}}
{{- define "tally.secretName" -}}
{{- default (include "tally.fullname" .) .Values.secret.existingSecret }}
{{- end }}

{{/* Data of the chart-managed Secret (also used by the migration hook's copy). */}}
{{- define "tally.secretData" -}}
{{ .Values.secret.databaseUrlKey }}: {{ .Values.secret.databaseUrl | b64enc | quote }}
{{- with .Values.secret.authTokens }}
{{ $.Values.secret.authTokensKey }}: {{ . | b64enc | quote }}
{{- end }}
{{- end }}

{{/* Environment from the Secret, for the server and the migration Job. */}}
{{- define "tally.secretEnv" -}}
{{- $secret := .secretName }}
{{- with .root }}
- name: TALLY_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.secret.databaseUrlKey }}
# Placeholder: bearer tokens of the coming authentication (not read by the server yet).
- name: TALLY_AUTH_TOKENS
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.secret.authTokensKey }}
      optional: true
{{- end }}
{{- end }}

{{/* The writable /tmp of the server and the migration Job (the root filesystem is read-only). */}}
{{- define "tally.tmpVolume" -}}
- name: tmp
  emptyDir:
    {{- with .Values.tmpVolume.medium }}
    medium: {{ . }}
    {{- end }}
    sizeLimit: {{ .Values.tmpVolume.sizeLimit }}
{{- end }}

{{/* Checks across values that the schema cannot express. */}}
{{- define "tally.validate" -}}
{{- if and (not .Values.secret.existingSecret) (not .Values.secret.databaseUrl) }}
{{- fail "tally: a database is required: set secret.databaseUrl (postgresql://user:password@host:5432/db) or secret.existingSecret (a Secret with the key secret.databaseUrlKey)" }}
{{- end }}
{{- $drain := addf .Values.lifecycle.preStopSleepSeconds .Values.config.shutdownGraceSeconds }}
{{- if le (float64 .Values.terminationGracePeriodSeconds) $drain }}
{{- fail (printf "tally: terminationGracePeriodSeconds (%v) must exceed lifecycle.preStopSleepSeconds + config.shutdownGraceSeconds (%v), or in-flight RPCs are killed" .Values.terminationGracePeriodSeconds $drain) }}
{{- end }}
{{- if and .Values.service.headless (ne .Values.service.type "ClusterIP") }}
{{- fail "tally: service.headless needs service.type ClusterIP" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "tally: autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- end }}
