{{/*
Chart name, truncated to 63 characters (a DNS label).
*/}}
{{- define "session-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: release name plus chart name unless the release name contains it.
*/}}
{{- define "session-operator.fullname" -}}
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

{{- define "session-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Standard labels (app.kubernetes.io/*) on every resource, without the component.
*/}}
{{- define "session-operator.baseLabels" -}}
helm.sh/chart: {{ include "session-operator.chart" . }}
app.kubernetes.io/name: {{ include "session-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: session-operator
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels of the operator's resources.
*/}}
{{- define "session-operator.labels" -}}
{{ include "session-operator.baseLabels" . }}
app.kubernetes.io/component: controller
{{- end }}

{{/*
Selector labels of the operator pods.
*/}}
{{- define "session-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "session-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{- define "session-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "session-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "session-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{- define "session-operator.leaseName" -}}
{{- default (include "session-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{- define "session-operator.leaseNamespace" -}}
{{- default .Release.Namespace .Values.leaderElection.namespace }}
{{- end }}

{{/*
Name of the Secret the chart creates from database.url / redis.url.
*/}}
{{- define "session-operator.storeSecretName" -}}
{{- printf "%s-store" (include "session-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Checks that fail the render with a clear message.
*/}}
{{- define "session-operator.validate" -}}
{{- if and (not .Values.database.existingSecret) (not .Values.database.url) (not .Values.redis.existingSecret) (not .Values.redis.url) }}
{{- fail "session-operator needs a store: set database.existingSecret (a Secret with the Postgres URL under database.existingSecretKey), or database.url, and/or the redis.* equivalents" }}
{{- end }}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail "replicaCount > 1 requires leaderElection.enabled=true: without a lease every replica would mutate the session store" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) }}
{{- fail "metrics.serviceMonitor.enabled requires metrics.service.enabled" }}
{{- end }}
{{- end }}

{{/*
Store configuration shared by the operator and the migration Job: environment variables.
Arguments: (dict "ctx" $ "secretName" NAME-OF-SECRET-WITH-CHART-MANAGED-URLS).
Credentials only ever come from Secrets (secretKeyRef), never as literals.
*/}}
{{- define "session-operator.storeEnv" -}}
{{- $ := .ctx }}
{{- if or $.Values.database.existingSecret $.Values.database.url }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.database.existingSecret | default .secretName }}
      key: {{ if $.Values.database.existingSecret }}{{ $.Values.database.existingSecretKey }}{{ else }}database-url{{ end }}
{{- end }}
{{- if or $.Values.redis.existingSecret $.Values.redis.url }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.redis.existingSecret | default .secretName }}
      key: {{ if $.Values.redis.existingSecret }}{{ $.Values.redis.existingSecretKey }}{{ else }}redis-url{{ end }}
{{- end }}
- name: SESSION_SCHEMA
  value: {{ $.Values.database.schema | quote }}
- name: REDIS_PREFIX
  value: {{ $.Values.redis.prefix | quote }}
{{- with $.Values.database.tls.sslMode }}
- name: PGSSLMODE
  value: {{ . | quote }}
{{- end }}
{{- if $.Values.database.tls.caSecret }}
- name: PGSSLROOTCERT
  value: /etc/session-operator/tls/postgres/ca.crt
{{- end }}
{{- if $.Values.redis.tls.caSecret }}
- name: REDIS_CA_FILE
  value: /etc/session-operator/tls/redis/ca.crt
{{- end }}
{{- end }}

{{- define "session-operator.tlsVolumeMounts" -}}
{{- if .Values.database.tls.caSecret }}
- name: postgres-ca
  mountPath: /etc/session-operator/tls/postgres
  readOnly: true
{{- end }}
{{- if .Values.redis.tls.caSecret }}
- name: redis-ca
  mountPath: /etc/session-operator/tls/redis
  readOnly: true
{{- end }}
{{- end }}

{{- define "session-operator.tlsVolumes" -}}
{{- if .Values.database.tls.caSecret }}
- name: postgres-ca
  secret:
    secretName: {{ .Values.database.tls.caSecret }}
    items:
      - key: {{ .Values.database.tls.caSecretKey }}
        path: ca.crt
{{- end }}
{{- if .Values.redis.tls.caSecret }}
- name: redis-ca
  secret:
    secretName: {{ .Values.redis.tls.caSecret }}
    items:
      - key: {{ .Values.redis.tls.caSecretKey }}
        path: ca.crt
{{- end }}
{{- end }}

{{/*
RBAC rules for watching policies and pods and reporting on them; used by the ClusterRole
(all namespaces) or by one Role per watched namespace. Exactly the calls the operator makes
(tests/chart/test_rbac_e2e.py records them): reflectors list+watch pods and policies, status
is written with patch, deletion costs are pod patches, kube-rs' event Recorder creates events
and patches repeats.
*/}}
{{- define "session-operator.watchRules" -}}
- apiGroups: [""]
  resources: ["pods"]
  verbs: {{ if .Values.rbac.podDeletionCost }}["list", "watch", "patch"]{{ else }}["list", "watch"]{{ end }}
- apiGroups: ["sessions.blockyard.io"]
  resources: ["sessionpolicies"]
  verbs: ["list", "watch"]
- apiGroups: ["sessions.blockyard.io"]
  resources: ["sessionpolicies/status"]
  verbs: ["patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
