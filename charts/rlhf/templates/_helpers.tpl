{{/* Names, labels, images, volumes and config files shared by every template. */}}

{{- define "rlhf.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rlhf.fullname" -}}
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

{{/* Name of one component's objects: "<fullname>-<component>" (kept under 63 characters). */}}
{{- define "rlhf.componentName" -}}
{{- printf "%s-%s" (include "rlhf.fullname" .root | trunc 45 | trimSuffix "-") .component }}
{{- end }}

{{- define "rlhf.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rlhf.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rlhf.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "rlhf.labels" -}}
helm.sh/chart: {{ include "rlhf.chart" .root }}
{{ include "rlhf.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: rlhf
{{- end }}

{{- define "rlhf.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rlhf.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The platform image for a pod; .gpu says whether the pod gets GPUs. */}}
{{- define "rlhf.image" -}}
{{- $img := .root.Values.image }}
{{- $tag := default .root.Chart.AppVersion $img.tag }}
{{- $flavor := $img.flavor }}
{{- if eq $flavor "auto" }}{{ $flavor = ternary "cuda" "cpu" (and .gpu .root.Values.gpu.enabled) }}{{ end }}
{{- if eq $flavor "none" }}
{{- printf "%s:%s" $img.repository $tag }}
{{- else }}
{{- printf "%s:%s-%s" $img.repository $tag $flavor }}
{{- end }}
{{- end }}

{{- define "rlhf.authSecretName" -}}
{{- default (printf "%s-auth" (include "rlhf.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* Secret and key holding the feedback store's database URL. */}}
{{- define "rlhf.databaseSecretName" -}}
{{- if .Values.feedback.database.existingSecret }}
{{- .Values.feedback.database.existingSecret }}
{{- else if .Values.postgresql.existingSecret }}
{{- .Values.postgresql.existingSecret }}
{{- else }}
{{- include "rlhf.componentName" (dict "root" . "component" "postgresql") }}
{{- end }}
{{- end }}

{{- define "rlhf.databaseSecretKey" -}}
{{- if .Values.feedback.database.existingSecret }}{{ .Values.feedback.database.secretKey }}{{ else }}url{{ end }}
{{- end }}

{{- define "rlhf.bundledPostgresql" -}}
{{- if and .Values.postgresql.enabled (not .Values.feedback.database.existingSecret) }}true{{ end }}
{{- end }}

{{- define "rlhf.checkpointsClaim" -}}
{{- default (include "rlhf.componentName" (dict "root" . "component" "checkpoints")) .Values.trainer.checkpoints.existingClaim }}
{{- end }}

{{- define "rlhf.modelsClaim" -}}
{{- default (include "rlhf.componentName" (dict "root" . "component" "models")) .Values.models.existingClaim }}
{{- end }}

{{/* In-cluster address (Service DNS name and gRPC port) of a component. */}}
{{- define "rlhf.target" -}}
{{- $svc := index .root.Values .component }}
{{- printf "%s.%s.svc:%d" (include "rlhf.componentName" .) .root.Release.Namespace (int $svc.port) }}
{{- end }}

{{/* Every replica of a component for a client that balances itself (gRPC round_robin over the headless
Service's pod addresses; the trainer also pushes weights to each): dns:///NAME-headless.NS.svc:PORT. */}}
{{- define "rlhf.replicasTarget" -}}
{{- $svc := index .root.Values .component }}
{{- printf "dns:///%s-headless.%s.svc:%d" (include "rlhf.componentName" .) .root.Release.Namespace (int $svc.port) }}
{{- end }}

{{/* Settings every server shares, as config keys (services/rlhf/core/config.py ServerConfig). */}}
{{- define "rlhf.serverConfig" -}}
{{- $v := .root.Values }}
{{- $cfg := dict "host" "0.0.0.0" "port" (int .port) "metrics_host" "0.0.0.0" "metrics_port" (int .metricsPort) }}
{{- $_ := set $cfg "log_level" $v.common.logLevel }}
{{- $_ := set $cfg "log_format" $v.common.logFormat }}
{{- $_ := set $cfg "grace_seconds" $v.common.graceSeconds }}
{{- if $v.auth.enabled }}{{ $_ := set $cfg "auth_token_file" "/var/run/secrets/rlhf/auth/token" }}{{ end }}
{{- toYaml $cfg }}
{{- end }}

{{/* The YAML config file of a server: chart-owned keys, then the component's `config` (which may not
repeat them). */}}
{{- define "rlhf.componentConfig" -}}
{{- $v := index .root.Values .component }}
{{- $owned := include "rlhf.serverConfig" (dict "root" .root "port" $v.port "metricsPort" $v.metricsPort) | fromYaml }}
{{- range $k, $val := .extra }}{{ $_ := set $owned $k $val }}{{ end }}
{{- range $k, $_ := $v.config }}
{{- if hasKey $owned $k }}{{ fail (printf "%s.config.%s: set by the chart; use the chart's own value for it" $.component $k) }}{{ end }}
{{- end }}
{{- toYaml (merge $owned (deepCopy $v.config) (deepCopy (default dict .defaults))) }}
{{- end }}

{{- define "rlhf.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{/* Volumes: config, token, /tmp, models, checkpoints. Flags in the dict choose which. */}}
{{- define "rlhf.authVolume" -}}
{{- if .Values.auth.enabled }}
- name: auth
  secret:
    secretName: {{ include "rlhf.authSecretName" . }}
    items:
      - key: {{ .Values.auth.secretKey }}
        path: token
{{- end }}
{{- end }}

{{- define "rlhf.authMount" -}}
{{- if .Values.auth.enabled }}
- name: auth
  mountPath: /var/run/secrets/rlhf/auth
  readOnly: true
{{- end }}
{{- end }}

{{- define "rlhf.modelsVolume" -}}
- name: models
{{- if eq .Values.models.volumeType "persistentVolumeClaim" }}
  persistentVolumeClaim:
    claimName: {{ include "rlhf.modelsClaim" . }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.models.sizeLimit }}
{{- end }}
{{- end }}

{{- define "rlhf.checkpointsVolume" -}}
- name: checkpoints
  persistentVolumeClaim:
    claimName: {{ include "rlhf.checkpointsClaim" . }}
{{- end }}

{{/* The init container that puts model weights on the models volume. */}}
{{- define "rlhf.modelInit" -}}
{{- if .root.Values.models.init.enabled }}
- name: model-init
  image: {{ include "rlhf.image" (dict "root" .root "gpu" false) }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  command:
    {{- toYaml .root.Values.models.init.command | nindent 4 }}
  env:
    - name: HOME
      value: /tmp
    - name: RLHF_CACHE_DIR
      value: /models/cache
    - name: HF_HUB_OFFLINE
      value: "1"
  securityContext:
    {{- toYaml .root.Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml .root.Values.models.init.resources | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: /models
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end }}

{{/* Native gRPC probes on the standard health service (overall status ""). */}}
{{- define "rlhf.grpcProbes" -}}
startupProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: {{ .probes.startupPeriodSeconds }}
  failureThreshold: {{ .probes.startupFailureThreshold }}
  timeoutSeconds: 5
readinessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: {{ .probes.readinessPeriodSeconds }}
  failureThreshold: 2
  timeoutSeconds: 5
livenessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: {{ .probes.livenessPeriodSeconds }}
  failureThreshold: {{ .probes.livenessFailureThreshold }}
  timeoutSeconds: 5
{{- end }}

{{/* resources with GPUs added when the pod gets them. */}}
{{- define "rlhf.resources" -}}
{{- $res := deepCopy (default dict .resources) }}
{{- if and .gpu .root.Values.gpu.enabled (gt (int .gpus) 0) }}
{{- $limits := default dict $res.limits }}
{{- $_ := set $limits .root.Values.gpu.resourceName (int .gpus) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* nodeSelector / tolerations / affinity with the GPU ones merged in. */}}
{{- define "rlhf.scheduling" -}}
{{- $gpu := and .gpu .root.Values.gpu.enabled }}
{{- $ns := deepCopy (default dict .values.nodeSelector) }}
{{- if $gpu }}{{ $ns = merge $ns (deepCopy .root.Values.gpu.nodeSelector) }}{{ end }}
{{- with $ns }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $tol := default list .values.tolerations }}
{{- if $gpu }}{{ $tol = concat $tol .root.Values.gpu.tolerations }}{{ end }}
{{- with $tol }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Chart-owned keys of the feedback config: the database URL file and the labeling page. */}}
{{- define "rlhf.feedbackExtra" -}}
{{- $l := .Values.feedback.labeling }}
database_url_file: /var/run/secrets/rlhf/database/url
labeling_port: {{ ternary (int $l.port) -1 $l.enabled }}
{{- if and $l.enabled $l.tokensSecret }}
labeling_tokens_file: /var/run/secrets/rlhf/labeling/tokens
{{- end }}
{{- if and $l.enabled $l.admins }}
labeling_admins: {{ toJson $l.admins }}
{{- end }}
{{- end }}
