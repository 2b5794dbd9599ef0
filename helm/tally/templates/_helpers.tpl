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

{{/* secret.authTokens as the JSON of TALLY_AUTH_TOKENS ("" when none): a JSON string as it
is, a YAML list as JSON. */}}
{{- define "tally.authTokensJson" -}}
{{- $tokens := .Values.secret.authTokens }}
{{- if kindIs "string" $tokens }}
{{- trim $tokens }}
{{- else if $tokens }}
{{- toJson $tokens }}
{{- end }}
{{- end }}

{{/* Data of the chart-managed Secret. The migration hook's copy (migration=true) holds only
the database URL: `tally migrate` needs nothing else. */}}
{{- define "tally.secretData" -}}
{{- $root := .root -}}
{{ $root.Values.secret.databaseUrlKey }}: {{ $root.Values.secret.databaseUrl | b64enc | quote }}
{{- if not .migration }}
{{- with include "tally.authTokensJson" $root }}
{{ $root.Values.secret.authTokensKey }}: {{ . | b64enc | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Environment from the Secret: TALLY_DATABASE_URL, and for the server (not the migration
Job) the bearer-token callers, an optional key (absent: authentication off). */}}
{{- define "tally.secretEnv" -}}
{{- $secret := .secretName }}
{{- $migration := .migration }}
{{- with .root }}
- name: TALLY_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.secret.databaseUrlKey }}
{{- if and (not $migration) .Values.secret.authTokensAsFile }}
- name: TALLY_AUTH_TOKENS_FILE
  value: /etc/tally/auth/callers.json
{{- else if not $migration }}
- name: TALLY_AUTH_TOKENS
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.secret.authTokensKey }}
      optional: true
{{- end }}
{{- end }}
{{- end }}

{{/* A probe's handler: a native gRPC health check of the plaintext health port (which
answers with or without TLS on the gRPC port). */}}
{{- define "tally.probeHandler" -}}
grpc:
  port: {{ .root.Values.containerPorts.health }}
  service: {{ .probe.service | quote }}
{{- end }}

{{/* TLS file paths of the server (the mounts of tally.tlsVolumes). */}}
{{- define "tally.tlsEnv" -}}
{{- if .Values.tls.enabled }}
- name: TALLY_TLS_CERT_FILE
  value: /etc/tally/tls/tls.crt
- name: TALLY_TLS_KEY_FILE
  value: /etc/tally/tls/tls.key
{{- if .Values.tls.clientCA.enabled }}
- name: TALLY_TLS_CLIENT_CA_FILE
  value: /etc/tally/client-ca/ca.crt
{{- end }}
{{- end }}
{{- end }}

{{- define "tally.tlsVolumeMounts" -}}
{{- if .Values.secret.authTokensAsFile }}
- name: auth-tokens
  mountPath: /etc/tally/auth
  readOnly: true
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/tally/tls
  readOnly: true
{{- if .Values.tls.clientCA.enabled }}
- name: client-ca
  mountPath: /etc/tally/client-ca
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{/* Mode 0440 (288): group-readable through podSecurityContext.fsGroup. The token file
(secret.authTokensAsFile) too. */}}
{{- define "tally.tlsVolumes" -}}
{{- if .Values.secret.authTokensAsFile }}
- name: auth-tokens
  secret:
    secretName: {{ include "tally.secretName" . }}
    defaultMode: 288
    items:
      - key: {{ .Values.secret.authTokensKey }}
        path: callers.json
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.tls.existingSecret }}
    defaultMode: 288
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- if .Values.tls.clientCA.enabled }}
- name: client-ca
  secret:
    secretName: {{ .Values.tls.clientCA.existingSecret }}
    defaultMode: 288
    items:
      - key: {{ .Values.tls.clientCA.key }}
        path: ca.crt
{{- end }}
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
{{- include "tally.validateAuthTokens" . }}
{{- if .Values.secret.authTokensAsFile }}
{{- if and (not .Values.secret.existingSecret) (not (include "tally.authTokensJson" .)) }}
{{- fail "tally: secret.authTokensAsFile needs callers: set secret.authTokens (or use secret.existingSecret with the key secret.authTokensKey)" }}
{{- end }}
{{- if not (hasKey .Values.podSecurityContext "fsGroup") }}
{{- fail "tally: secret.authTokensAsFile needs podSecurityContext.fsGroup (the file is mounted with mode 0440, readable through that group)" }}
{{- end }}
{{- end }}
{{- with .Values.tls }}
{{- if and .enabled (not .existingSecret) }}
{{- fail "tally: tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret with tls.crt and tls.key)" }}
{{- end }}
{{- if and .clientCA.enabled (not .enabled) }}
{{- fail "tally: tls.clientCA.enabled (mutual TLS) needs tls.enabled" }}
{{- end }}
{{- if and .clientCA.enabled (not .clientCA.existingSecret) }}
{{- fail "tally: tls.clientCA.enabled needs tls.clientCA.existingSecret (a Secret with the CA certificate under tls.clientCA.key)" }}
{{- end }}
{{- if and .enabled (not (hasKey $.Values.podSecurityContext "fsGroup")) }}
{{- fail "tally: tls.enabled needs podSecurityContext.fsGroup (the certificate files are mounted with mode 0440, readable through that group)" }}
{{- end }}
{{- end }}
{{- end }}

{{/* secret.authTokens, checked as the server will read it (a mistake there would only show as
pods that fail to start). */}}
{{- define "tally.validateAuthTokens" -}}
{{- $tokens := .Values.secret.authTokens }}
{{- if and $tokens .Values.secret.existingSecret }}
{{- fail (printf "tally: secret.authTokens is unused with secret.existingSecret: put the callers' JSON under the key %s of the Secret %s instead" .Values.secret.authTokensKey .Values.secret.existingSecret) }}
{{- end }}
{{- $json := include "tally.authTokensJson" . }}
{{- if $json }}
{{- if not (hasPrefix "[" $json) }}
{{- fail "tally: secret.authTokens must be a JSON list of callers ([{\"name\": ..., \"sha256\": ..., \"methods\": [...]}, ...])" }}
{{- end }}
{{- $callers := fromJsonArray $json }}
{{- $seen := dict }}
{{- range $i, $caller := $callers }}
{{- if not (kindIs "map" $caller) }}
{{- fail (printf "tally: secret.authTokens is not a JSON list of callers: %v" $caller) }}
{{- end }}
{{- $name := get $caller "name" }}
{{- if not (and (kindIs "string" $name) $name) }}
{{- fail (printf "tally: secret.authTokens[%d]: name must be a non-empty string" $i) }}
{{- end }}
{{- $hash := get $caller "sha256" }}
{{- if not (and (kindIs "string" $hash) (regexMatch "^[0-9a-fA-F]{64}$" $hash)) }}
{{- fail (printf "tally: secret.authTokens[%d] (%s): sha256 must be the 64 hex digits of the token's SHA-256 (`tally hash-token`), not the token" $i $name) }}
{{- end }}
{{- if hasKey $seen (lower $hash) }}
{{- fail (printf "tally: secret.authTokens[%d] (%s): the same sha256 as %s; each token must be distinct" $i $name (get $seen (lower $hash))) }}
{{- end }}
{{- $_ := set $seen (lower $hash) $name }}
{{- $methods := get $caller "methods" }}
{{- if not (and (kindIs "slice" $methods) $methods) }}
{{- fail (printf "tally: secret.authTokens[%d] (%s): methods must be a non-empty list of globs over package.Service/Method" $i $name) }}
{{- end }}
{{- range $methods }}
{{- if not (and (kindIs "string" .) .) }}
{{- fail (printf "tally: secret.authTokens[%d] (%s): every method must be a non-empty string" $i $name) }}
{{- end }}
{{- end }}
{{- range $key, $_ := $caller }}
{{- if not (has $key (list "name" "sha256" "methods")) }}
{{- fail (printf "tally: secret.authTokens[%d] (%s): unknown key %q (name, sha256, methods)" $i $name $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
