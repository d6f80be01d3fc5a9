{{/*
The Deployment, Service and PodDisruptionBudget of one gRPC server (generation, reward, feedback).
Arguments: root (the chart context), component, gpu (whether the pod may get GPUs), models (mount /models),
checkpoints (mount /checkpoints read-only), database (mount the database URL secret).
*/}}

{{- define "rlhf.serviceDeployment" -}}
{{- $root := .root }}
{{- $v := index $root.Values .component }}
{{- $name := include "rlhf.componentName" . }}
{{- $ctx := dict "root" $root "component" .component }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "rlhf.labels" $ctx | nindent 4 }}
spec:
  {{- if not (and (eq .component "reward") $v.autoscaling.enabled) }}
  replicas: {{ $v.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "rlhf.selectorLabels" $ctx | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxUnavailable: 0
      maxSurge: 1
  template:
    metadata:
      labels:
        {{- include "rlhf.labels" $ctx | nindent 8 }}
        {{- with $v.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "rlhf.serviceAccountName" $root }}
      automountServiceAccountToken: {{ $root.Values.serviceAccount.automountToken }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- include "rlhf.podSecurityContext" $root | nindent 8 }}
      terminationGracePeriodSeconds: {{ add (int $root.Values.common.graceSeconds) 10 }}
      {{- include "rlhf.scheduling" (dict "root" $root "values" $v "gpu" .gpu) | nindent 6 }}
      {{- if .models }}
      {{- with include "rlhf.modelInit" (dict "root" $root) }}
      initContainers:
        {{- . | nindent 8 }}
      {{- end }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "rlhf.image" (dict "root" $root "gpu" .gpu) }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args: ["serve", {{ .component | quote }}, "--config", "/etc/rlhf/{{ .component }}.yaml"]
          ports:
            - name: grpc
              containerPort: {{ $v.port }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $v.metricsPort }}
              protocol: TCP
            {{- if and (eq .component "feedback") $v.labeling.enabled }}
            - name: labeling
              containerPort: {{ $v.labeling.port }}
              protocol: TCP
            {{- end }}
          env:
            - name: HOME
              value: /tmp
            - name: RLHF_CACHE_DIR
              value: /models/cache
            - name: HF_HUB_OFFLINE
              value: "1"
            - name: POD_NAME
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
            {{- with $root.Values.common.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- include "rlhf.grpcProbes" (dict "port" $v.port "probes" $v.probes) | nindent 10 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          resources:
            {{- include "rlhf.resources" (dict "root" $root "resources" $v.resources "gpu" .gpu "gpus" (default 0 $v.gpus)) | nindent 12 }}
          volumeMounts:
            - name: config
              mountPath: /etc/rlhf
              readOnly: true
            - name: tmp
              mountPath: /tmp
            {{- include "rlhf.authMount" $root | nindent 12 }}
            {{- if .models }}
            - name: models
              mountPath: /models
            {{- end }}
            {{- if and .checkpoints $root.Values.trainer.checkpoints.mountInServices }}
            - name: checkpoints
              mountPath: /checkpoints
              readOnly: true
            {{- end }}
            {{- if .database }}
            - name: database
              mountPath: /var/run/secrets/rlhf/database
              readOnly: true
            {{- end }}
            {{- if and .database $v.labeling.enabled $v.labeling.tokensSecret }}
            - name: labeling-tokens
              mountPath: /var/run/secrets/rlhf/labeling
              readOnly: true
            {{- end }}
      volumes:
        - name: config
          configMap:
            name: {{ include "rlhf.componentName" (dict "root" $root "component" "config") }}
        - name: tmp
          emptyDir: {}
        {{- include "rlhf.authVolume" $root | nindent 8 }}
        {{- if .models }}
        {{- include "rlhf.modelsVolume" $root | nindent 8 }}
        {{- end }}
        {{- if and .checkpoints $root.Values.trainer.checkpoints.mountInServices }}
        {{- include "rlhf.checkpointsVolume" $root | nindent 8 }}
        {{- end }}
        {{- if .database }}
        - name: database
          secret:
            secretName: {{ include "rlhf.databaseSecretName" $root }}
            items:
              - key: {{ include "rlhf.databaseSecretKey" $root }}
                path: url
        {{- end }}
        {{- if and .database $v.labeling.enabled $v.labeling.tokensSecret }}
        - name: labeling-tokens
          secret:
            secretName: {{ $v.labeling.tokensSecret }}
            items:
              - key: tokens
                path: tokens
        {{- end }}
{{- end }}

{{- define "rlhf.serviceObject" -}}
{{- $v := index .root.Values .component }}
{{- $ctx := dict "root" .root "component" .component }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "rlhf.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "rlhf.labels" $ctx | nindent 4 }}
spec:
  type: {{ $v.serviceType }}
  selector:
    {{- include "rlhf.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $v.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    {{- if and (eq .component "feedback") $v.labeling.enabled }}
    - name: labeling
      port: {{ $v.labeling.port }}
      targetPort: labeling
      protocol: TCP
      appProtocol: http
    {{- end }}
---
{{/* /metrics on a Service of its own, always ClusterIP: exposing the API (a LoadBalancer for the reward
service) never exposes the metrics. Prometheus finds it by the rlhf.dev/metrics label. */}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "rlhf.componentName" . }}-metrics
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "rlhf.labels" $ctx | nindent 4 }}
    rlhf.dev/metrics: "true"
spec:
  type: ClusterIP
  selector:
    {{- include "rlhf.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: metrics
      port: {{ $v.metricsPort }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
{{- end }}

{{/* A headless Service: its DNS name resolves to every ready pod, for clients that spread calls over the
replicas themselves (the PPO trainer: gRPC round_robin, and a weight push to each generation replica). */}}
{{- define "rlhf.headlessServiceObject" -}}
{{- $v := index .root.Values .component }}
{{- $ctx := dict "root" .root "component" .component }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "rlhf.componentName" . }}-headless
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "rlhf.labels" $ctx | nindent 4 }}
spec:
  clusterIP: None
  selector:
    {{- include "rlhf.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $v.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
{{- end }}

{{- define "rlhf.pdbObject" -}}
{{- $v := index .root.Values .component }}
{{- $ctx := dict "root" .root "component" .component }}
{{- if $v.pdb.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "rlhf.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "rlhf.labels" $ctx | nindent 4 }}
spec:
  maxUnavailable: {{ $v.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "rlhf.selectorLabels" $ctx | nindent 6 }}
{{- end }}
{{- end }}
